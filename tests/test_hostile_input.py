"""Broken and hostile checkpoints through the whole daemon: each is rejected with a
reason that names the file, nothing in it runs, and the next good checkpoint still goes
through; and a version still being written is never taken before it is complete."""

from __future__ import annotations

import shutil
import threading
import time

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
