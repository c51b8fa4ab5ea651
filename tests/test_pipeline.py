"""The whole pipeline in-process (the `kiln optimize` path): ingest, inspect, build,
measure, promote, with real worker processes, onnxruntime sessions and a SQLite file."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import assert_payload, optimize_once, tiny_mlp
from modelkiln import hookimpl
from modelkiln.plugins.api import JobEvent, PromotionEvent, VariantEvent
from modelkiln.store import queries, views
from modelkiln.store.db import open_store
from modelkiln.store.models import Checkpoint


def promoted_entries(config):
    from modelkiln.daemon.promoter import Promoter

    store = open_store(config)
    with store.session() as session:
        return [Promoter(config, None, config.promoted_path).describe(p) for p in queries.current_promotions(session)]


def all_variants(config, model):
    store = open_store(config)
    with store.session() as session:
        return [views.variant_dict(v) for v in queries.variants_of_model(session, model)]


def test_digits_checkpoint_is_promoted_within_tolerance(config, digits_checkpoint, trained_digits):
    checkpoint = optimize_once(config, digits_checkpoint, "digits")
    assert checkpoint.status == "done", checkpoint.reason
    variants = all_variants(config, "digits")
    assert {v["variant"] for v in variants} == {
        "onnxruntime:baseline", "onnxruntime:quantize.int8_dynamic", "torch:baseline", "torch:quantize.int8_dynamic"}
    assert all(v["status"] == "succeeded" for v in variants), variants
    for v in variants:
        m = v["metrics"]
        assert m["quality_metric"] == "accuracy"
        assert m["latency_p50_ms"] > 0 and m["latency_p95_ms"] >= m["latency_p50_ms"]
        assert [b["batch_size"] for b in m["batches"]] == [1, 4]
        assert m["size_bytes"] > 0
    int8 = next(v for v in variants if v["variant"] == "onnxruntime:quantize.int8_dynamic")
    base = next(v for v in variants if v["variant"] == "onnxruntime:baseline")
    assert int8["metrics"]["size_bytes"] < base["metrics"]["size_bytes"] / 2
    assert int8["lineage"][0]["step"] == "quantize.int8_dynamic"

    (entry,) = promoted_entries(config)
    assert entry["model"] == "digits" and entry["target"] == "cpu"
    m = entry["metrics"]
    assert (m["baseline_quality"] - m["quality"]) / m["baseline_quality"] <= 0.01
    link = config.promoted_path / "digits" / "cpu"
    assert link.is_symlink() and entry["path"] == str(link)
    document = json.loads((link / "variant.json").read_text())
    assert document["recipe"] == entry["recipe"] and document["checkpoint"]["content_hash"]

    # Serving code needs no modelkiln: plain onnxruntime or plain torch loads it.
    _, x_eval, y_eval = trained_digits
    if document["runtime"] == "onnxruntime":
        import onnxruntime as ort

        session = ort.InferenceSession(str(link / document["file"]), providers=["CPUExecutionProvider"])
        logits = session.run(None, {session.get_inputs()[0].name: x_eval})[0]
    else:
        path = link / document["file"]
        module = torch.export.load(str(path)).module() if path.suffix == ".pt2" else torch.jit.load(str(path))
        logits = module(torch.from_numpy(x_eval)).detach().numpy()
    accuracy = float(np.mean(logits.argmax(1) == y_eval))
    assert accuracy == pytest.approx(m["quality"], abs=1e-9)
    # How finely the eval rows tell a drop: the paired differences' standard error.
    if entry["recipe"] == "baseline":
        assert m["checks"]["quality_delta_se"] == 0.0
    else:
        original = next(v for v in variants if v["recipe"] == "baseline")
        assert 0 <= m["checks"]["quality_delta_se"] < 0.05 and "quality_delta_se" in original["metrics"]["checks"]


def test_same_content_never_runs_twice(config, digits_checkpoint):
    first = optimize_once(config, digits_checkpoint, "digits", "1")
    again = optimize_once(config, digits_checkpoint, "digits", "1")
    assert again.id == first.id
    twin = optimize_once(config, digits_checkpoint, "digits", "2")
    assert twin.status == "duplicate" and "digits/1" in twin.reason
    store = open_store(config)
    with store.session() as session:
        assert len(queries.variants_of_model(session, "digits")) == 4
        assert {p.checkpoint_id for p in queries.promotion_history(session, "digits")} == {first.id}


def test_changed_content_is_a_new_checkpoint(config, tiny_checkpoint):
    from safetensors.torch import save_file

    first = optimize_once(config, tiny_checkpoint, "tiny", "1")
    torch.manual_seed(1)
    save_file(tiny_mlp().state_dict(), str(tiny_checkpoint / "model.safetensors"))
    second = optimize_once(config, tiny_checkpoint, "tiny", "1")
    assert second.id != first.id and second.content_hash != first.content_hash
    store = open_store(config)
    with store.session() as session:
        history = queries.promotion_history(session, "tiny")
    # Each checkpoint's steps (anytime promotion), the first's all before the second's.
    owners = [p.checkpoint_id for p in history]
    assert set(owners) == {first.id, second.id} and owners == sorted(owners)
    assert os.readlink(config.promoted_path / "tiny" / "cpu").count(second.content_hash[:16]) == 1


def test_a_folder_without_a_model_is_rejected_with_the_reason(config, tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    checkpoint = optimize_once(config, folder, "junk")
    assert checkpoint.status == "rejected" and "no supported model file" in checkpoint.reason


def test_a_pickle_checkpoint_is_rejected_and_never_run(config, tmp_path):
    from test_formats import Evil

    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"w": Evil(str(marker))}, folder / "model.pt")
    checkpoint = optimize_once(config, folder, "tiny")
    assert checkpoint.status == "rejected" and "weights-only" in checkpoint.reason
    assert not marker.exists()


def test_onnx_checkpoint_is_served_by_torch_through_its_import(config, tmp_path):
    from test_formats import export_onnx

    folder = export_onnx(tmp_path / "onnxmodel")
    checkpoint = optimize_once(config, folder, "onnxmodel")
    assert checkpoint.status == "done"
    by_name = {v["variant"]: v for v in all_variants(config, "onnxmodel")}
    # The graph imported into torch (checked against onnxruntime) is what torch serves.
    assert by_name["torch:baseline"]["status"] == "succeeded", by_name["torch:baseline"]["reason"]
    assert by_name["torch:baseline"]["metrics"]["quality"] == 1.0
    assert by_name["onnxruntime:baseline"]["status"] == "succeeded"
    assert by_name["onnxruntime:baseline"]["metrics"]["quality_metric"] == "top1_agreement"


class Recorder:
    """A plugin that records events and overrides the policy: serve the largest artifact."""

    def __init__(self):
        self.measured, self.promoted, self.lifecycle, self.offered = [], [], [], []

    @hookimpl
    def kiln_daemon_started(self, config):
        self.lifecycle.append(("started", config.source))

    @hookimpl
    def kiln_daemon_stopping(self):
        self.lifecycle.append(("stopping", None))

    @hookimpl
    def kiln_variant_ended(self, variant):
        self.measured.append(variant)

    @hookimpl
    def kiln_variant_promoted(self, promotion):
        self.promoted.append(promotion)

    @hookimpl
    def kiln_choose_variant(self, candidates, policy):
        self.offered.extend(candidates)
        return max(candidates, key=lambda c: c["metrics"]["size_bytes"])


class Broken:
    __name__ = "broken"

    @hookimpl
    def kiln_daemon_started(self, config):
        raise RuntimeError("a plugin that cannot start")

    @hookimpl
    def kiln_variant_ended(self, variant):
        raise RuntimeError("a broken plugin")

    @hookimpl
    def kiln_choose_variant(self, candidates, policy):
        raise RuntimeError("a broken policy")


@pytest.mark.hooks("kiln_daemon_started", "kiln_daemon_stopping", "kiln_variant_ended", "kiln_variant_promoted",
                   "kiln_choose_variant")
def test_event_hooks_and_a_policy_plugin(config, tiny_checkpoint):
    recorder = Recorder()
    checkpoint = optimize_once(config, tiny_checkpoint, "tiny", extra_plugins=[recorder, Broken()])
    assert checkpoint.status == "done"  # the broken plugin was logged and skipped
    assert len(recorder.measured) == 4 and all("status" in v for v in recorder.measured)
    # Anytime: the plugin's choice among the variants measured so far is promoted as it
    # changes; the last is its choice among all of them.
    promotion = recorder.promoted[-1]
    largest = max((v for v in recorder.measured if v["status"] == "succeeded"), key=lambda v: v["metrics"]["size_bytes"])
    assert promotion["variant"] == largest["variant"]
    assert all(p["reason"].endswith("policy of plugin Recorder") or p["reason"].endswith("(policy of plugin Recorder)")
               for p in recorder.promoted)
    assert len({p["variant"] for p in recorder.promoted}) == len(recorder.promoted)
    assert recorder.lifecycle == [("started", config.source), ("stopping", None)]
    # What a plugin author was promised, key by key and type by type.
    for payload in recorder.measured + recorder.offered:
        assert_payload(payload, VariantEvent)
    assert all("within_tolerance" in c and "fits_memory" in c for c in recorder.offered)
    for payload in recorder.promoted:
        assert_payload(payload, PromotionEvent)


class FailedJobs:
    def __init__(self):
        self.jobs = []

    @hookimpl
    def kiln_job_failed(self, job):
        self.jobs.append(job)


@pytest.mark.parametrize(
    "factory, reason",
    [
        ("helpers:hanging_factory", "timed out after 4 s in inspect"),
        ("helpers:crashing_factory", "killed by signal SIGKILL"),
        ("helpers:exiting_factory", "SystemExit"),
        ("helpers:greedy_factory", "out of memory"),
    ],
)
@pytest.mark.hooks("kiln_job_failed")
def test_a_worker_that_hangs_crashes_or_exits_fails_one_job(config, tiny_checkpoint, factory, reason):
    config.workers.job_timeout_seconds = 4
    config.workers.max_attempts = 1
    config.workers.memory_limit_mb = 512
    config.architectures["tiny"].factory = factory
    failed = FailedJobs()
    checkpoint = optimize_once(config, tiny_checkpoint, "tiny", extra_plugins=[failed])
    assert checkpoint.status == "failed" and reason in checkpoint.reason
    (job,) = failed.jobs  # kiln_job_failed, once, with the same reason
    assert_payload(job, JobEvent)
    assert (job["kind"], job["model"], job["attempts"]) == ("inspect", "tiny", 1) and reason in job["reason"]
    # The daemon lives on: the next checkpoint goes through.
    config.architectures["tiny"].factory = "helpers:tiny_mlp"
    staged = tiny_checkpoint.parent / "v2"
    shutil.copytree(tiny_checkpoint, staged)
    (staged / "eval.npz").unlink(missing_ok=True)
    torch.manual_seed(5)
    from safetensors.torch import save_file

    save_file(tiny_mlp().state_dict(), str(staged / "model.safetensors"))
    assert optimize_once(config, staged, "tiny", "2").status == "done"


def test_hugging_face_checkpoint_end_to_end(config, tmp_path):
    from test_formats import tiny_bert

    checkpoint = optimize_once(config, tiny_bert(tmp_path / "bert"), "bert")
    assert checkpoint.status == "done", checkpoint.reason
    assert checkpoint.info["inputs"][0]["shape"] == [-1, 64]  # capped by max_position_embeddings
    by_name = {v["variant"]: v for v in all_variants(config, "bert")}
    assert all(v["status"] == "succeeded" for v in by_name.values()), by_name
    assert by_name["torch:baseline"]["file"] == "model.pt2"
    assert by_name["onnxruntime:baseline"]["metrics"]["quality_metric"] == "top1_agreement"
    assert by_name["onnxruntime:baseline"]["metrics"]["quality"] == pytest.approx(1.0)
    (entry,) = promoted_entries(config)
    assert entry["model"] == "bert"


def test_cleanup_removes_what_a_killed_daemon_left(config):
    from modelkiln.daemon.service import STALE_INCOMING_SECONDS, Daemon

    daemon = Daemon(config, watch=False, schedule=False, preload=False)
    daemon.start()
    try:
        stale_staging = config.artifacts_path / "m" / "abc" / "cpu" / ".tmp-onnxruntime--baseline-job7"
        stale_staging.mkdir(parents=True)
        old_copy = daemon.layout.incoming / "m-old"
        fresh_copy = daemon.layout.incoming / "m-fresh"
        old_copy.mkdir(parents=True)
        fresh_copy.mkdir()
        old = daemon.wall_clock() - STALE_INCOMING_SECONDS - 10
        os.utime(old_copy, (old, old))
        daemon.inbox.put(("cleanup", None))
        daemon.run_once(0)
        assert not stale_staging.exists() and not old_copy.exists() and fresh_copy.exists()
    finally:
        daemon.stop(5)


def test_eval_data_that_does_not_fit_the_model_is_rejected_with_the_reason(config, tiny_checkpoint):
    np.savez(tiny_checkpoint / "eval.npz", inputs=np.zeros((8, 5), np.float32), labels=np.zeros(8, np.int64))
    checkpoint = optimize_once(config, tiny_checkpoint, "tiny")
    assert checkpoint.status == "rejected" and "fails on its sample inputs" in checkpoint.reason
    np.savez(tiny_checkpoint / "eval.npz", inputs=np.zeros((8, 2, 16), np.float32), labels=np.zeros(8, np.int64))
    checkpoint = optimize_once(config, tiny_checkpoint, "tiny", "2")
    assert checkpoint.status == "rejected" and "per row" in checkpoint.reason


def test_retry_after_fixing_the_config(config, kiln_dir, tiny_checkpoint):
    from click.testing import CliRunner

    from modelkiln.cli import main

    del config.architectures["tiny"]  # the factory is missing: rejected
    checkpoint = optimize_once(config, tiny_checkpoint, "tiny")
    assert checkpoint.status == "rejected" and "[architectures.tiny]" in checkpoint.reason
    result = CliRunner().invoke(main, ["retry", "tiny", "--config", str(kiln_dir / "kiln.toml")])
    assert result.exit_code == 0 and "inspected again" in result.output
    from modelkiln.config import load_config

    fixed = load_config(kiln_dir / "kiln.toml")  # the file still has the factory
    again = optimize_once(fixed, tiny_checkpoint, "tiny")
    assert again.id == checkpoint.id and again.status == "done"
    assert CliRunner().invoke(main, ["retry", "tiny", "--config", str(kiln_dir / "kiln.toml")]).exit_code != 0


def test_close_variants_are_decided_by_a_run_off_timed_side_by_side(kiln_dir, digits_checkpoint):
    from modelkiln.config import load_config
    from modelkiln.policy import RUNOFF_MOST

    # Every eligible variant counts as close: the run-off takes the best RUNOFF_MOST.
    text = (kiln_dir / "kiln.toml").read_text().replace("runoff_margin = 0.0", "runoff_margin = 100.0")
    (kiln_dir / "kiln.toml").write_text(text)
    config = load_config(kiln_dir / "kiln.toml")
    checkpoint = optimize_once(config, digits_checkpoint, "digits")
    assert checkpoint.status == "done", checkpoint.reason
    variants = all_variants(config, "digits")
    raced = [v for v in variants if v["metrics"]["runoff"]]
    assert len(raced) == RUNOFF_MOST, [v["metrics"] for v in variants]
    ids = sorted(v["id"] for v in raced)
    for v in raced:
        runoff = v["metrics"]["runoff"]
        assert runoff["latency_p50_ms"] > 0 and runoff["latency_p95_ms"] >= runoff["latency_p50_ms"]
        assert runoff["rounds"] == 6 and runoff["batch_size"] == 1
        assert runoff["rivals"] == [i for i in ids if i != v["id"]]
    with open_store(config).session() as session:
        job = queries.job_by_key(session, queries.runoff_key(session.get(Checkpoint, checkpoint.id), "cpu"))
        assert (job.kind, job.state) == ("runoff", "succeeded")
    (promotion,) = promoted_entries(config)
    assert promotion["variant_id"] == min(raced, key=lambda v: v["metrics"]["runoff"]["latency_p50_ms"])["id"]
    # Promoted by the run-off, or earlier (anytime) and then confirmed by it.
    assert (f"by a run-off of {RUNOFF_MOST} variants timed side by side" in promotion["reason"]
            or "variant job(s) still to end" in promotion["reason"]), promotion["reason"]
    out = subprocess.run([sys.executable, "-m", "modelkiln", "variants", "digits", "--config", str(kiln_dir / "kiln.toml")],
                         capture_output=True, text=True, check=True).stdout
    assert "run-off p50" in out and "timed again side by side" in out
