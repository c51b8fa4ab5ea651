"""Promotion by throughput under load against promotion by batch-1 latency.

The wide MLP of ``bench_steps.py`` (64-2048-2048-10, trained on digits), recipes
baseline and int8_dynamic on both runtimes, a cpu target with 2 threads measured at
batch 1 and under 1, 2, 4 and 8 concurrent clients (``concurrency``). One daemon run;
then the built-in policy chooses from the same catalogue twice: by p50 latency at batch 1
(the default) and by ``throughput_at_p95_ms`` (with ``p95_limit_ms``, default 2 ms).
Run: .venv/bin/python bench/bench_load.py [P95_LIMIT_MS]
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_steps import train
from common import optimize, print_table, recipes_config

LEVELS = [1, 2, 4, 8]


def main():
    from modelkiln.config import load_config
    from modelkiln.demo import write_checkpoint
    from modelkiln.policy import best_load_level, choose, within_tolerance

    limit = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    folder = recipes_config(["baseline", "quantize.int8_dynamic"],
                            '\n[architectures.wide]\nfactory = "bench_steps:wide_mlp"\ninput_shape = [64]\n')
    path = folder / "kiln.toml"
    path.write_text(path.read_text().replace("concurrency = []", f"concurrency = {LEVELS}", 1))
    config = load_config(path)
    model, x_train, x_eval, y_eval = train()
    checkpoint_dir = folder / "staged" / "wide"
    write_checkpoint(model, x_eval, y_eval, checkpoint_dir, train_inputs=x_train)
    started = time.time()
    variants, promoted = optimize(config, checkpoint_dir, "wide")
    by_load = dataclasses.replace(config.policy, objective="throughput_at_p95_ms", p95_limit_ms=limit)
    for v in variants:
        v["within_tolerance"] = within_tolerance(v, config.policy)
    latency_choice = choose(variants, config.policy)
    load_choice = choose(variants, by_load)
    rows = []
    for v in variants:
        m = v.get("metrics") or {}
        best = best_load_level(v, by_load)
        rows.append([
            ("L" if v is latency_choice else "") + ("T" if v is load_choice else ""), v["variant"],
            f"{m['latency_p50_ms']:.3f}", f"{(m.get('runoff') or {}).get('latency_p50_ms') or 0:.3f}",
            *[f"{row['throughput_per_s']:.0f} / {row['latency_p95_ms']:.2f}" for row in m.get("load") or []],
            f"{best['throughput_per_s']:.0f} at {best['concurrency']}" if best else "none",
        ])
    print_table(f"wide MLP 64-2048-2048-10, cpu target, 2 threads ({time.time() - started:.0f} s); L: chosen by p50 at "
                f"batch 1, T: chosen by throughput with p95 <= {limit:g} ms",
                rows, ["", "variant", "p50 ms b1", "run-off p50", *[f"{n} clients: /s / p95 ms" for n in LEVELS],
                       "best within the p95 limit"])


if __name__ == "__main__":
    main()
