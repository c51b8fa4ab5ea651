"""A measurement that cannot win ends early: the sequential test (``harness.slower_than``)
and a daemon run with a variant made slow on purpose."""

from __future__ import annotations

import json
import os

from click.testing import CliRunner
from test_operations import TESTS, kiln, set_config
from test_reliability import install_entry_point

from modelkiln.cli import main


def test_the_sequential_test_stops_a_clearly_slower_variant_and_only_that():
    from modelkiln.targets.harness import slower_than

    rivals = {"the served variant (torch:baseline)": 10.0, "the baseline": 8.0}
    stop = slower_than(rivals, 1.5)
    times = []
    for _ in range(30):
        times.append(40.0)
        reason = stop(times)
        if reason:
            break
    assert reason is not None and len(times) == 11  # eleven runs over 1.5x the slower rival
    assert reason.startswith("ended early: 4.0x slower than the served variant (torch:baseline) (10 ms), "
                             "5.0x slower than the baseline (8 ms) after 11 runs")
    # Runs of a tiny model: the test is as sure, but waits for a quarter second of runs.
    stop = slower_than({"the baseline": 0.01}, 1.5)
    assert next(n for n in range(1, 1000) if stop([1.0] * n)) == 250
    # Slower than one rival but not the other (or not by the margin): never stopped, and
    # after a few runs within the margin the test stops watching, whatever comes later.
    for within in (14.0, 9.0):
        stop = slower_than(rivals, 1.5)
        assert not any(stop([within] * n) for n in range(1, 31))
    stop = slower_than(rivals, 1.5)
    times = [12.0, 12.0, 40.0]
    assert stop(times) is None
    assert not any(stop(times + [40.0] * n) for n in range(1, 30))
    # A busy host's outliers among fast runs do not end a measurement.
    stop = slower_than(rivals, 1.5)
    busy = [60.0, 9.0, 60.0, 60.0, 9.0, 60.0] * 5
    assert not any(stop(busy[:n]) for n in range(1, len(busy) + 1))


def test_a_variant_made_slow_on_purpose_ends_its_measurement_early(tmp_path, kiln_dir, tiny_checkpoint):
    """``fault.heavy`` adds three 512 x 512 products to each call of the tiny MLP: after
    the baseline is served, its timing at batch 1 stops once the test is sure, batch 4 is
    never timed, and it is recorded as measured with its figures and why, in `kiln
    variants` and the report."""
    site = tmp_path / "site"
    install_entry_point(site, "faults", "fault_steps")
    path = kiln_dir / "kiln.toml"
    # Timing windows of 1 to 3 s: the baseline fills them, the heavy variant stops after
    # the runs the test needs (well within, however busy the host).
    set_config(path, ["baseline", "fault.heavy"], ('runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]'),
               ("max_seconds = 0.2", "max_seconds = 3.0"), ("min_seconds = 0.0", "min_seconds = 1.0"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(TESTS)])}
    kiln(path, "optimize", str(tiny_checkpoint), "--model", "tiny", "--version", "1", env=env)
    runner, cfg = CliRunner(), ["--config", str(path)]
    variants = {v["variant"]: v for v in json.loads(runner.invoke(main, ["variants", "tiny", "--json", *cfg]).output)}
    baseline, heavy = variants["torch:baseline"], variants["torch:fault.heavy"]
    assert baseline["status"] == heavy["status"] == "succeeded", (baseline["reason"], heavy["reason"])
    assert baseline["reason"] is None and [b["batch_size"] for b in baseline["metrics"]["batches"]] == [1, 4]
    assert (heavy["reason"] or "").startswith("ended early: ") and "slower than the served baseline (torch:baseline)" \
        in heavy["reason"], (heavy["reason"], heavy["metrics"]["batches"])
    (batch,) = heavy["metrics"]["batches"]
    assert batch["batch_size"] == 1 and batch["runs"] >= 11
    assert batch["runs"] * batch["latency_p50_ms"] < 750  # well within the 1 s window
    assert batch["latency_p50_ms"] > 3 * baseline["metrics"]["batches"][0]["latency_p50_ms"]
    assert "ended early" in runner.invoke(main, ["variants", "tiny", *cfg]).output
    assert runner.invoke(main, ["report", "tiny", "--out", str(tmp_path / "report"), *cfg]).exit_code == 0
    assert "ended early: " in (tmp_path / "report" / "tiny.html").read_text()
    (served,) = json.loads(runner.invoke(main, ["promoted", "--json", *cfg]).output)
    assert served["variant"] == "torch:baseline"


def test_a_margin_below_one_is_refused(tmp_path):
    import pytest

    from modelkiln.config import ConfigError, load_config, write_default_config

    path = write_default_config(tmp_path)
    path.write_text(path.read_text().replace("give_up_margin = 3.0", "give_up_margin = 0.5"))
    with pytest.raises(ConfigError, match="'measure.give_up_margin' .0.5. would end the measurement of variants faster"):
        load_config(path)
