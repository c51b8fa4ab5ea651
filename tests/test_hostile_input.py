"""Broken and hostile checkpoints through the whole daemon: each is rejected with a
reason that names the file, nothing in it runs, and the next good checkpoint still goes
through; and a version still being written is never taken before it is complete."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
import torch

from helpers import optimize_once, run_until_done, tiny_mlp
from modelkiln.daemon.service import Daemon
from modelkiln.registry.directory import content_hash, observe
from modelkiln.store import queries


def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    torch.manual_seed(0)
    return save(tiny_mlp().state_dict())


def _zip_state_dict(folder):
    torch.save(tiny_mlp().state_dict(), folder / "model.pt")
    return (folder / "model.pt").read_bytes()


def _onnx_bytes(folder):
    from test_formats import export_onnx

    return (export_onnx(folder / "x") / "model.onnx").read_bytes()


def _write(name, data):
    def make(folder):
        (folder / name).write_bytes(data(folder) if callable(data) else data)
    return make


def _huge_header(folder):
    # The first 8 bytes claim a 2**60-byte header: must not be allocated or read.
    (folder / "model.safetensors").write_bytes((2**60).to_bytes(8, "little") + b"{}")


def _hf_bad_config(folder):
    from test_formats import tiny_bert

    tiny_bert(folder / "hf")
    for f in (folder / "hf").iterdir():
        shutil.move(str(f), folder / f.name)
    (folder / "hf").rmdir()
    (folder / "config.json").write_text('{"model_type": "bert", "hidden_size": ')  # cut off


def _hf_truncated_weights(folder):
    from test_formats import tiny_bert

    tiny_bert(folder / "hf")
    for f in (folder / "hf").iterdir():
        shutil.move(str(f), folder / f.name)
    (folder / "hf").rmdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _text_with_a_broken_line(folder):
    from test_interface import tiny_encoder

    tiny_encoder(folder / "hf")
    for f in (folder / "hf").iterdir():
        shutil.move(str(f), folder / f.name)
    (folder / "hf").rmdir()
    with open(folder / "calibration.jsonl", "a") as handle:
        handle.write('{"text": "an unterminated string\n')


def _hf_config_bigger_than_its_weights(folder):
    from test_formats import tiny_bert

    tiny_bert(folder / "hf", vocab_size=25_000_000)  # 3 GiB of embeddings described, 100 KB stored
    for f in (folder / "hf").iterdir():
        shutil.move(str(f), folder / f.name)
    (folder / "hf").rmdir()


CASES = {
    "empty safetensors": (_write("model.safetensors", b""), "model.safetensors"),
    "truncated safetensors": (_write("model.safetensors", lambda f: _safetensors_bytes()[:700]), "model.safetensors"),
    "huge safetensors header": (_huge_header, "model.safetensors"),
    "empty state dict": (_write("model.pt", b""), "model.pt"),
    "truncated state dict": (_write("model.pt", lambda f: _zip_state_dict(f)[:900]), "model.pt"),
    "garbage state dict": (_write("model.pth", b"\x80\x04not really a pickle"), "model.pth"),
    "empty onnx": (_write("model.onnx", b""), "model.onnx"),
    "corrupt onnx": (_write("model.onnx", lambda f: b"\x08\x07\x12garbage" + _onnx_bytes(f)[40:90]), "model.onnx"),
    "hugging face config cut off": (_hf_bad_config, "config.json"),
    "hugging face weights truncated": (_hf_truncated_weights, "model.safetensors"),
    "calibration text with a broken line": (_text_with_a_broken_line, "calibration.jsonl"),
    "hugging face config bigger than its weights": (_hf_config_bigger_than_its_weights, "config.json"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_checkpoint_is_rejected_with_a_reason_naming_the_file(config, tmp_path, tiny_checkpoint, case):
    make, file = CASES[case]
    folder = tmp_path / "broken"
    folder.mkdir()
    make(folder)
    for leftover in folder.glob("x"):
        shutil.rmtree(leftover)
    checkpoint = optimize_once(config, folder, "tiny", "1")
    assert checkpoint.status == "rejected", (checkpoint.status, checkpoint.reason)
    # The file where the user put it, not the daemon's snapshot of it.
    assert str(folder / file) in checkpoint.reason, checkpoint.reason
    # The daemon goes on: a good checkpoint of the same model is processed next.
    assert optimize_once(config, tiny_checkpoint, "tiny", "2").status == "done"


def test_a_version_being_written_is_never_taken_before_it_is_complete(config, tiny_checkpoint):
    """A weights file grows for 10 s, then eval.npz arrives: one checkpoint, the final content."""
    import numpy as np

    config.registry.quiet_seconds = 2.0
    data = _safetensors_bytes()
    version = config.registry_path / "tiny" / "1"
    version.mkdir(parents=True)
    chunks = 40  # one every 0.25 s: 10 s of writing, never quiet for the 2 s it takes

    def writer():
        with open(version / "model.safetensors", "wb") as fh:
            for i in range(chunks):
                fh.write(data[i * len(data) // chunks:(i + 1) * len(data) // chunks])
                fh.flush()
                time.sleep(0.25)
        time.sleep(0.5)
        np.savez(version / "eval.npz", inputs=np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32),
                 labels=np.zeros(32, dtype=np.int64))

    daemon = Daemon(config, preload=False)
    daemon.start()
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while thread.is_alive():
            daemon.run_once(0.05)
            with daemon.store.session() as session:
                assert queries.checkpoints(session) == [], "taken while still being written"
        final_hash = content_hash(version, observe(version).files)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            daemon.run_once(0.1)
            with daemon.store.session() as session:
                checkpoints = queries.checkpoints(session)
            if checkpoints:
                break
        (checkpoint,) = checkpoints
        assert checkpoint.content_hash == final_hash
        assert run_until_done(daemon, checkpoint.id).status == "done"
        with daemon.store.session() as session:
            assert len(queries.checkpoints(session)) == 1
    finally:
        thread.join()
        daemon.stop(5)


# -- the registry: links, names, nesting, order ------------------------------------------


def test_links_loops_odd_names_and_deep_folders_are_refused_and_never_stop_the_scan(config, tmp_path,
                                                                                     tiny_checkpoint, caplog):
    import os

    registry = config.registry_path
    model = registry / "good"
    model.mkdir(parents=True)
    outside = tmp_path / "outside"
    shutil.copytree(tiny_checkpoint, outside)
    os.symlink(outside, model / "linked")  # a version folder that is a link: never followed
    for version in ("2", "3", "4", "9", "10"):
        shutil.copytree(tiny_checkpoint, model / version)
    os.symlink("b", model / "2" / "a")  # a loop of links
    os.symlink("a", model / "2" / "b")
    (model / "3" / b"caf\xe9.bin".decode("utf-8", "surrogateescape")).write_bytes(b"x")  # not UTF-8
    deep = model / "4"
    for _ in range(40):
        deep = deep / "d"
    deep.mkdir(parents=True)
    (model / "10" / "notes.txt").write_text("a later version")  # not a duplicate of 9
    (registry / "bad\nname").mkdir()
    (model / "stray-file").write_text("not a version")

    time.sleep(config.registry.quiet_seconds + 0.5)  # every folder quiet: the scan takes what is complete
    daemon = Daemon(config, watch=False, schedule=False, preload=False)
    daemon.start()
    try:
        daemon.reconcile()
        daemon.reconcile()  # a second scan logs nothing new
        assert daemon.registry.locate(model / "linked" / "model.safetensors") == []
        with daemon.store.session() as session:
            rows = {c.version: (c.status, c.reason) for c in queries.checkpoints(session, "good")}
            order = [c.version for c in queries.checkpoints(session, "good")]
    finally:
        daemon.stop(0)
    assert "linked" not in rows
    assert rows["2"][0] == "rejected" and "symlink(s) 'a', 'b' lead nowhere" in rows["2"][1]
    assert rows["3"][0] == "rejected" and "file name(s) 'caf\\xe9.bin' are not UTF-8; rename them" in rows["3"][1]
    assert rows["4"][0] == "rejected" and "nested deeper than 32 levels" in rows["4"][1]
    assert rows["9"][0] == rows["10"][0] == "ingested"
    assert order.index("9") < order.index("10")  # versions in version order, not text order
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert any(str(model / "linked") in m and "is a symlink, which is never followed" in m for m in skipped)
    assert any("bad\\nname" in m and "is not a valid name" in m for m in skipped)
    assert any("stray-file" in m and "is a file where a version folder is expected" in m for m in skipped)
    assert len(skipped) == 3, skipped  # each once, not at every rescan


def test_an_older_version_taken_late_never_replaces_a_newer_promotion(config, tiny_checkpoint):
    from safetensors.torch import save_file

    newer = optimize_once(config, tiny_checkpoint, "tiny", "2")
    torch.manual_seed(5)
    save_file(tiny_mlp().state_dict(), str(tiny_checkpoint / "model.safetensors"))
    older = optimize_once(config, tiny_checkpoint, "tiny", "1")
    assert newer.status == older.status == "done"
    from modelkiln.store.db import open_store

    store = open_store(config)
    with store.session() as session:
        (served,) = queries.current_promotions(session)
        assert served.checkpoint_id == newer.id
    store.dispose()


# -- sample data that lies ------------------------------------------------------------


@pytest.mark.parametrize("make, message", [
    (lambda p: np.save(open(p, "wb"), np.zeros((4, 16), np.float32)), "not an .npz archive (a plain .npy"),
    (lambda p: np.savez(p, inputs=np.full((4, 16), np.nan, np.float32), labels=np.zeros(4, np.int64)),
     "array inputs holds NaN or infinite values in 4 of its 4 rows"),
    (lambda p: np.savez(p, inputs=np.zeros((4, 16), np.float32), labels=np.zeros((4, 2), np.int64)),
     "labels has shape (4, 2)"),
    (lambda p: np.savez(p, inputs=np.float32(1.0), labels=np.zeros(4, np.int64)), "is a single number"),
], ids=["plain npy", "NaN inputs", "2-D labels", "0-d inputs"])
def test_sample_data_that_lies_is_refused_with_the_cause(tmp_path, make, message):
    from modelkiln.errors import CheckpointRejected
    from modelkiln.registry.data import load_eval

    make(tmp_path / "eval.npz")
    with pytest.raises(CheckpointRejected, match=re.escape(message)) as caught:
        load_eval(tmp_path)
    assert str(tmp_path / "eval.npz") in str(caught.value)


def test_an_npz_that_claims_gigabytes_uncompressed_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import modelkiln.registry.data as data
    from modelkiln.errors import CheckpointRejected

    np.savez_compressed(tmp_path / "eval.npz", inputs=np.zeros((4096, 1024), np.float32),
                        labels=np.zeros(4096, np.int64))
    monkeypatch.setattr(data, "MAX_DATA_BYTES", 2**20)  # 16 MiB of zeros stand for the 6 GB bomb
    with pytest.raises(CheckpointRejected, match="GiB uncompressed; at most"):
        data.load_eval(tmp_path)


# -- outputs no metric may call faithful -------------------------------------------------


def test_zero_nan_and_constant_outputs_are_never_faithful():
    from modelkiln.targets.quality import COSINE, TOP1_AGREEMENT, degenerate_reason, row_cosines, score

    reference = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    assert score(COSINE, reference, reference, None) == pytest.approx(1.0)
    assert score(COSINE, np.zeros_like(reference), reference, None) == 0.0
    assert score(COSINE, np.full_like(reference, np.nan), reference, None) == 0.0
    assert score(TOP1_AGREEMENT, np.full_like(reference, np.nan), reference, None) == 0.0
    assert row_cosines(COSINE, np.zeros((2, 3)), np.zeros((2, 3))).tolist() == [1.0, 1.0]  # both zero: equal
    assert degenerate_reason(np.full_like(reference, np.inf), reference) == "NaN or infinite outputs on 8 of 8 samples"
    assert degenerate_reason(np.ones_like(reference), reference).startswith("the same output for all 8 samples")
    assert degenerate_reason(reference, reference) is None


def test_a_variant_that_outputs_zeros_misses_the_gate_with_the_reason(config, tiny_checkpoint):
    import re as _re

    path = config.source
    text = _re.sub(r"(?m)^recipes = \[[^\]]*\]", 'recipes = ["baseline", "prune.magnitude(amount=0.999)"]',
                   path.read_text())
    path.write_text(text.replace('runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]'))
    from modelkiln.config import load_config
    from modelkiln.store.db import open_store

    config = load_config(path)
    checkpoint = optimize_once(config, tiny_checkpoint, "tiny", "1")
    store = open_store(config)
    with store.session() as session:
        variants = {v.recipe: v for v in queries.variants_of(session, checkpoint.id)}
        served = [p.variant.recipe for p in queries.current_promotions(session)]
        dead = variants["prune.magnitude(amount=0.999)"]
        assert dead.status == "succeeded" and dead.quality < 0.5
        assert dead.reason.startswith("quality gate not met: ")
    store.dispose()
    assert served == [""]


# -- a checkpoint whose inspection ran out of attempts ----------------------------------------


def test_a_checkpoint_whose_inspection_gave_up_is_failed_and_can_be_retried(config):
    from datetime import timedelta

    from modelkiln.store import units
    from modelkiln.store.db import open_store
    from modelkiln.store.models import utcnow

    store = open_store(config)
    with store.session() as session:
        checkpoint_id = units.record_checkpoint(
            session, model="m", version="1", registry_kind="directory", source_uri="file:///m/1", format=None,
            content_hash="a" * 64, size_bytes=1, fingerprint="f", status="ingested", reason=None,
            snapshot_path="/nowhere")
        for _ in range(config.workers.max_attempts):
            (job,) = units.lease_jobs(session, "host:1", [], 1, 1.0)
            units.requeue_expired(session, config.workers.max_attempts, "its lease expired",
                                  now=utcnow() + timedelta(seconds=5))
        checkpoint = queries.checkpoint(session, checkpoint_id)
        assert checkpoint.status == "failed" and "gave up after 3 attempts" in checkpoint.reason
        retried = units.retry_checkpoints(session, "m")
        assert [(c.id, n) for c, n in retried] == [(checkpoint_id, 0)]
        assert queries.checkpoint(session, checkpoint_id).status == "ingested"
    store.dispose()


def test_a_sparse_file_claiming_gigabytes_is_refused_before_it_is_copied(config, tiny_checkpoint, caplog):
    config.registry.max_checkpoint_gb = 1.0
    version = config.registry_path / "tiny" / "1"
    shutil.copytree(tiny_checkpoint, version)
    with open(version / "padding.bin", "wb") as handle:  # 5 GiB apparent, a few KB on disk
        handle.truncate(5 * 2**30)
    time.sleep(config.registry.quiet_seconds + 0.5)
    daemon = Daemon(config, watch=False, schedule=False, preload=False)
    daemon.start()
    try:
        started = time.monotonic()
        daemon.reconcile()
        daemon.reconcile()
        took = time.monotonic() - started
        with daemon.store.session() as session:
            assert queries.checkpoints(session) == []
    finally:
        daemon.stop(0)
    assert took < 5, took  # nothing was copied or hashed
    refused = [r.getMessage() for r in caplog.records if "over registry.max_checkpoint_gb" in r.getMessage()]
    assert len(refused) == 1 and str(version) in refused[0] and "5.0 GiB" in refused[0]
    incoming = config.artifacts_path / ".incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []


def test_a_folder_nested_a_thousand_deep_does_not_leave_the_daemon_deaf(config, tiny_checkpoint, caplog):
    """watchdog walks a folder renamed into place to report what is inside; 1,100 nested
    folders raised RecursionError in its emitter thread, which died: no event was seen
    again until a restart. Then an emitter that dies anyway: the daemon notices, restarts
    the watcher and scans for what it missed."""
    from helpers import place

    daemon = Daemon(config, preload=False)  # watching, with its scheduler (rescans every 60 s)
    daemon.start()
    try:
        staging = config.registry_path / ".staging"
        deep = staging / "1"
        deep.mkdir(parents=True)
        shutil.copytree(tiny_checkpoint, deep, dirs_exist_ok=True)
        for _ in range(1100):
            deep = deep / "d"
            deep.mkdir()
        (config.registry_path / "deep").mkdir()
        (staging / "1").rename(config.registry_path / "deep" / "1")

        def seen_within(model: str, seconds: float) -> float:
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                daemon.run_once(0.2)
                with daemon.store.session() as session:
                    if queries.checkpoints(session, model):
                        break
            return time.monotonic() - started

        assert seen_within("deep", 15) < 15
        assert daemon.watcher.alive
        place(tiny_checkpoint, config.registry_path, "tiny", "1")
        assert seen_within("tiny", 15) < 15  # by its event, not the minute-long rescan
        assert not any("the file watcher stopped" in r.getMessage() for r in caplog.records)

        next(iter(daemon.watcher._observer.emitters)).stop()  # an emitter dies anyway
        place(tiny_checkpoint, config.registry_path, "tiny2", "1")
        assert seen_within("tiny2", 15) < 15
        assert daemon.watcher.alive
        with daemon.store.session() as session:
            assert [c.status for c in queries.checkpoints(session, "deep")] == ["rejected"]
    finally:
        daemon.stop(0)
        # rm walks without recursion: Python's rmtree (pytest's clean-up too) would not.
        subprocess.run(["rm", "-rf", str(config.registry_path / "deep")], check=True)
    assert any("the file watcher stopped" in r.getMessage() for r in caplog.records)
