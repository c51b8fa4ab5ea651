"""The gate judges on rows a variant never saw, with a confidence bound, and refuses to
promote what the data cannot vouch for (pipeline.heldout, pipeline.probes, the gate in
targets.quality, the policy)."""

import json
import re

import numpy as np
import pytest

from helpers import optimize_once
from test_decoding import TEXT, word_tokenizer
from test_pipeline import all_variants

WORDS = sorted({w.strip(".,").lower() for w in TEXT.split()})


def sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct sentences in the word tokenizer's vocabulary."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < count:
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
        if text not in out:
            out.append(text)
    return out


def tiny_encoder(folder, layers: int = 4):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         vocab_size=64, max_position_embeddings=64)).save_pretrained(str(folder))
    word_tokenizer(folder)
    return folder


def write_jsonl(path, texts, labels=None):
    rows = [{"text": t} if labels is None else {"text": t, "label": int(label)} for t, label in
            zip(texts, labels if labels is not None else texts)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def settled(folder, count: int = 64):
    from modelkiln.pipeline.samples import settle
    from modelkiln.plugins.api import LoadContext
    from modelkiln.registry.formats import HuggingFaceFormat

    return settle(HuggingFaceFormat().load(folder, LoadContext("bert")), folder, count)


def _row_texts(rows: dict) -> set[tuple]:
    """Each row's real tokens, as a comparable tuple."""
    ids, mask = rows["input_ids"], rows["attention_mask"]
    return {tuple(ids[i][mask[i].astype(bool)]) for i in range(len(ids))}


# -- held out means unseen ------------------------------------------------------------


def test_repeated_calibration_text_counts_once_and_is_never_both_judged_and_trained_on(tmp_path):
    folder = tiny_encoder(tmp_path / "bert")
    base = sentences(100)
    # Request logs repeat themselves, with other spacing (the tokenizer here has no upper case).
    lines = base + base[:40] + ["  " + s.replace(" ", "   ") for s in base[40:80]]
    write_jsonl(folder / "calibration.jsonl", lines)
    first = settled(folder)
    assert first.split.heldout_rows == 64 and first.split.training_rows == 36
    assert not first.split.trained_on_samples
    assert not _row_texts(first.samples) & _row_texts(first.train)
    # The quality samples are chosen by content: the same rows whatever the file's order.
    write_jsonl(folder / "calibration.jsonl", list(reversed(lines)))
    assert _row_texts(settled(folder).samples) == _row_texts(first.samples)


def test_texts_that_differ_in_case_width_and_spacing_are_one_row():
    from modelkiln.pipeline.heldout import text_key

    assert text_key("Hello  World\t") == text_key("hello world") == text_key("ＨＥＬＬＯ world")
    assert text_key("hello, world") != text_key("hello world")


def test_eval_data_is_the_quality_set_and_nothing_equal_to_it_is_trained_on(tmp_path):
    folder = tiny_encoder(tmp_path / "bert")
    held = sentences(70, seed=1)
    write_jsonl(folder / "eval.jsonl", held + held[:10])  # duplicates count once
    write_jsonl(folder / "train.jsonl", sentences(50, seed=2) + held[:20])
    result = settled(folder)
    assert result.source == "eval.jsonl" and result.split.heldout_rows == 70
    assert result.split.training_source == "train.jsonl" and result.split.removed == 20
    assert not _row_texts(result.samples) & _row_texts(result.train)


def test_an_eval_npz_without_labels_is_a_held_out_set_judged_by_fidelity(tmp_path):
    from modelkiln.registry.data import load_eval

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", inputs=rng.standard_normal((80, 8)).astype(np.float32))
    assert set(load_eval(tmp_path)) == {"inputs"}


def test_generated_samples_train_on_other_generated_rows():
    from modelkiln.pipeline.heldout import array_keys
    from modelkiln.pipeline.samples import generate
    from modelkiln.plugins.api import InputSpec

    inputs = [InputSpec("input_ids", (-1, 32), "int64", high=1000, dims=("batch", "sequence")),
              InputSpec("attention_mask", (-1, 32), "int64", dims=("batch", "sequence"))]
    samples, train = generate(inputs, 64), generate(inputs, 256, seed=1)
    assert not set(array_keys(samples)) & set(array_keys(train))
    # Padding is no part of a row's content: a row padded further is the same row.
    wider = {k: np.pad(v[:1], ((0, 0), (0, 8))) for k, v in samples.items()}
    assert array_keys(wider) == array_keys({k: v[:1] for k, v in samples.items()})


# -- the confidence bound -------------------------------------------------------------


def test_the_drop_bound_is_the_drop_where_every_sample_agrees_and_wider_where_few_carry_it():
    from modelkiln.targets.quality import COSINE, TOP1_AGREEMENT, drop_bounds

    reference = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
    same = drop_bounds(TOP1_AGREEMENT, reference, reference)
    assert same["0.95"] == pytest.approx(0.0)
    # One sample in 64 answers differently: a mean drop of 1.6 %, but it could be twice that.
    changed = reference.copy()
    changed[0] = -changed[0]
    bounds = drop_bounds(TOP1_AGREEMENT, changed, reference)
    assert bounds["0.5"] <= 1 / 64 + 1e-9 < bounds["0.95"]
    # Cosines: a uniform small loss has a tight bound, one broken sample a wide one.
    noisy = reference + 0.01 * np.random.default_rng(1).standard_normal(reference.shape).astype(np.float32)
    tight = drop_bounds(COSINE, noisy, reference)
    assert tight["0.99"] - tight["0.5"] < 1e-4
    broken = reference.copy()
    broken[3] = np.random.default_rng(2).standard_normal(10)
    wide = drop_bounds(COSINE, broken, reference)
    assert wide["0.95"] > 2 * wide["0.5"] > 0


def test_the_gate_refuses_a_mean_within_tolerance_whose_bound_is_not():
    from modelkiln.targets.quality import GateLimits, gate_reason

    checks = {"samples": 32, "quality_drop_bounds": {"0.5": 0.008, "0.9": 0.02, "0.95": 0.031, "0.99": 0.05}}
    reason = gate_reason(0.992, 1.0, "top1_agreement", checks, GateLimits())
    assert reason and "as large as 3.10%" in reason and "95.0% confidence" in reason
    assert gate_reason(0.992, 1.0, "top1_agreement", checks, GateLimits(confidence=0.0)) is None
    assert "99.0%" in gate_reason(0.992, 1.0, "top1_agreement", checks, GateLimits(confidence=0.98))


def test_a_variant_that_trained_needs_enough_unseen_rows_to_be_promoted():
    from modelkiln.targets.quality import GateLimits, heldout_reason

    def lineage(**data):
        return [{"step": "distill.depth", "data": {"quality_source": "calibration.jsonl", **data}}]

    assert heldout_reason(lineage(heldout_rows=64, training_rows=36), 64) is None
    few = heldout_reason(lineage(heldout_rows=20, training_rows=80), 64)
    assert "only 20 distinct rows" in few and "eval.jsonl with at least 64" in few
    own = heldout_reason(lineage(quality_rows=16, heldout_rows=0, training_rows=16, trained_on_samples=True), 64)
    assert "its own quality samples" in own and "train.jsonl" in own and "eval.jsonl with at least 64" in own
    enough = heldout_reason(lineage(quality_rows=360, heldout_rows=0, training_rows=360, trained_on_samples=True,
                                    quality_source="eval.npz"), 64)
    assert "ship train.npz" in enough and "eval.npz with" not in enough  # the eval rows are enough
    assert heldout_reason(lineage(quality_rows=3, heldout_rows=0, training_rows=3, trained_on_samples=True), 0) is None
    assert heldout_reason([{"step": "quantize.int8_dynamic", "record": {}}], 64) is None
    assert GateLimits().min_heldout_rows == 64


# -- the probe set ----------------------------------------------------------------------


def test_the_probe_set_is_fixed_varied_and_distinct():
    from modelkiln.pipeline.probes import PROBE_COUNT, probe_texts

    texts = probe_texts()
    assert texts == probe_texts() and len(set(texts)) == len(texts) == PROBE_COUNT
    lengths = [len(t.split()) for t in texts]
    assert min(lengths) <= 2 and max(lengths) >= 30
    assert any("?" in t for t in texts) and any(re.search(r"\d", t) for t in texts)


def test_a_student_that_learnt_only_the_calibration_text_fails_the_probe_set():
    from modelkiln.targets.quality import COSINE, GateLimits, gate_reason, probe_checks

    rng = np.random.default_rng(0)
    reference = rng.standard_normal((192, 16))
    faithful = probe_checks(COSINE, reference + 0.01 * rng.standard_normal(reference.shape), reference)
    assert gate_reason(1.0, 1.0, "pooled_cosine", faithful, GateLimits()) is None
    broken = reference.copy()
    broken[::4] = rng.standard_normal((48, 16))  # a quarter of the probes answered as something else
    figures = probe_checks(COSINE, broken, reference)
    reason = gate_reason(1.0, 1.0, "pooled_cosine", figures, GateLimits())
    assert "192 probe sentences" in reason and "worst probe sentence" in reason


# -- through the daemon -----------------------------------------------------------------


def test_a_student_of_sixteen_sentences_repeated_four_times_is_measured_but_not_promoted(kiln_dir, tmp_path):
    """The case that fooled the gate: calibration text of 16 sentences, each 4 times.
    Post-training variants are judged on the 16 distinct sentences; the student, which
    has nothing else to train on, is measured, refused with what to ship, and
    `kiln promote --force` alone serves it."""
    from click.testing import CliRunner

    from modelkiln.cli import main
    from modelkiln.config import load_config

    text = (kiln_dir / "kiln.toml").read_text().replace(
        'recipes = ["baseline", "quantize.int8_dynamic"]', 'recipes = ["baseline", "distill.depth(steps=4)"]')
    (kiln_dir / "kiln.toml").write_text(text.replace('runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]'))
    config = load_config(kiln_dir / "kiln.toml")
    folder = tiny_encoder(tmp_path / "encoder")
    write_jsonl(folder / "calibration.jsonl", sentences(16) * 4)
    checkpoint = optimize_once(config, folder, "encoder")
    assert checkpoint.status == "done", checkpoint.reason
    assert checkpoint.info["data_split"]["quality_rows"] == 16
    assert checkpoint.info["data_split"]["heldout_rows"] == 0  # nothing was held out of training
    by_recipe = {v["recipe"]: v for v in all_variants(config, "encoder")}
    student = by_recipe["distill.depth(steps=4)"]
    assert student["status"] == "succeeded" and student["metrics"]["checks"]["samples"] == 16
    assert student["lineage"][0]["data"]["trained_on_samples"]
    assert "its own quality samples" in student["reason"] and "eval.jsonl" in student["reason"]
    baseline = by_recipe["baseline"]
    assert baseline["reason"] is None, baseline["reason"]
    assert baseline["metrics"]["checks"]["probe_rows"] > 100

    runner = CliRunner()
    listing = runner.invoke(main, ["variants", "encoder", "--config", str(kiln_dir / "kiln.toml")])
    assert listing.exit_code == 0, listing.output
    assert "16 samples, all trained on" in listing.output and "16 samples, drop <= 0.00% (95%)" in listing.output
    status = json.loads(runner.invoke(main, ["status", "--json", "--config", str(kiln_dir / "kiln.toml")]).output)
    assert status["checkpoints"][0]["data_split"]["quality_rows"] == 16
    report = runner.invoke(main, ["report", "encoder", "--out", str(tmp_path / "report"),
                                  "--config", str(kiln_dir / "kiln.toml")])
    assert report.exit_code == 0, report.output
    page = (tmp_path / "report" / "encoder.html").read_text()
    assert "16 samples, all trained on" in page and "upper bound at 95% confidence" in page
    refused = runner.invoke(main, ["promote", "encoder", "cpu", "torch:distill.depth(steps=4)",
                                   "--config", str(kiln_dir / "kiln.toml")])
    assert refused.exit_code != 0 and "eval.jsonl" in str(refused.exception or refused.output)
    forced = runner.invoke(main, ["promote", "encoder", "cpu", "torch:distill.depth(steps=4)", "--force",
                                  "--config", str(kiln_dir / "kiln.toml")])
    assert forced.exit_code == 0, forced.output


def test_a_training_step_runs_its_floor_of_steps_however_busy_the_host():
    import torch

    from modelkiln.steps.training import distill

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    student = torch.nn.Sequential(torch.nn.Linear(8, 4))
    inputs = {"input": np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)}
    # A budget spent before the first step ends: the floor still runs, then the clock stops it.
    trained = distill(student, teacher, inputs, steps=50, learning_rate=1e-3, max_seconds=1e-9, min_steps=7)
    assert trained["steps"] == 7 and "after 7 of 50 steps" in trained["stopped"]
    assert distill(student, teacher, inputs, steps=5, learning_rate=1e-3, max_seconds=1e-9,
                   min_steps=7)["steps"] == 5  # never more than planned


def test_a_refused_variant_whose_training_was_cut_short_says_so():
    from modelkiln.targets.quality import GateLimits, gate_reason

    stopped = "time budget of 69 s reached after 23 of 500 steps"
    lineage = [{"step": "distill.depth", "record": {"distill_stopped": stopped}}]
    reason = gate_reason(0.95, 1.0, "pooled_cosine", {}, GateLimits(), lineage=lineage)
    assert "stopped early: time budget of 69 s reached after 23 of 500 steps" in reason and "max_seconds" in reason
    assert gate_reason(1.0, 1.0, "pooled_cosine", {}, GateLimits(), lineage=lineage) is None
