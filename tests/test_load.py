"""Measurement under load: closed-loop clients against one loaded artifact."""

import time
from pathlib import Path

import pytest


def test_clients_overlap_where_the_runtime_lets_them():
    from modelkiln.targets.load import load_curve

    calls = []

    def run(request):  # waits as a session does while it computes: the GIL is free meanwhile
        calls.append(request["x"])
        time.sleep(0.005)

    one, four = load_curve(run, {"x": 1}, [1, 4], seconds=0.5, warmup_runs=1)
    assert (one["concurrency"], four["concurrency"]) == (1, 4)
    assert 4.5 <= one["latency_p50_ms"] <= 15 and one["latency_p95_ms"] >= one["latency_p50_ms"]
    assert 60 <= one["throughput_per_s"] <= 220
    assert 2.5 * one["throughput_per_s"] <= four["throughput_per_s"] <= 4.5 * one["throughput_per_s"]
    assert one["requests"] + four["requests"] + 1 == len(calls)


def test_a_client_error_is_raised_not_swallowed():
    from modelkiln.targets.load import load_curve

    def run(request):
        raise RuntimeError("the session failed")

    with pytest.raises(RuntimeError, match="the session failed"):
        load_curve(run, {}, [2], seconds=0.1, warmup_runs=0)


def test_a_target_with_concurrency_promotes_by_throughput_at_its_p95_limit(kiln_dir, tiny_checkpoint):
    import json
    import subprocess
    import sys

    from helpers import optimize_once
    from modelkiln.config import ConfigError, load_config
    from modelkiln.store import queries, views
    from modelkiln.store.db import open_store

    path = kiln_dir / "kiln.toml"
    text = path.read_text().replace('objective = "latency_p50_ms"', 'objective = "throughput_at_p95_ms"')
    path.write_text(text)
    with pytest.raises(ConfigError, match="needs load figures: set 'concurrency' on target\\(s\\) cpu "):
        load_config(path)
    path.write_text(text.replace("concurrency = []", "concurrency = [2, 1, 2]", 1).replace(
        "p95_limit_ms = 0.0", "p95_limit_ms = 50.0").replace("runoff_margin = 0.0\n", "runoff_margin = 100.0\n"))
    config = load_config(path)
    assert config.targets["cpu"].concurrency == [1, 2]  # each level once, fewest clients first
    checkpoint = optimize_once(config, tiny_checkpoint, "tiny")
    assert checkpoint.status == "done", checkpoint.reason
    store = open_store(config)
    with store.session() as session:
        variants = [views.variant_dict(v) for v in queries.variants_of_model(session, "tiny")]
        (promotion,) = queries.current_promotions(session)
        reason = promotion.reason
    store.dispose()
    for variant in variants:
        load = variant["metrics"]["load"]
        assert [row["concurrency"] for row in load] == [1, 2]
        assert all(row["requests"] > 0 and 0 < row["latency_p50_ms"] <= row["latency_p95_ms"] for row in load)
        document = json.loads((Path(variant["path"]) / "variant.json").read_text())
        assert document["metrics"]["load"] == load
    from modelkiln.policy import objective_value, runoff_value

    # Every variant is close enough for a run-off here (the best three take part): it
    # measured them under load in turns, and its levels decided.
    raced = [v for v in variants if v["metrics"]["runoff"]]
    assert len(raced) == 3 and all(v["metrics"]["runoff"]["load"][1]["concurrency"] == 2 for v in raced)
    best = min(raced, key=lambda v: runoff_value(v, config.policy))
    assert promotion.variant_id == best["id"] and objective_value(best, config.policy) > 0
    assert "most requests per second under concurrent clients with p95 within 50 ms" in reason
    out = subprocess.run([sys.executable, "-m", "modelkiln", "variants", "tiny", "--config", str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert "under load (clients: answers/s, p95 ms)" in out and "2: " in out
    subprocess.run([sys.executable, "-m", "modelkiln", "report", "tiny", "--out", str(kiln_dir / "report"),
                    "--config", str(path)], capture_output=True, text=True, check=True)
    page = (kiln_dir / "report" / "tiny.html").read_text()
    assert "Under load" in page and "<th>2 clients</th>" in page and page.count("<b>") >= len(variants)
