"""The demo's end-to-end time, split into plugin work, measurement and the rest.

From the rename of the digits checkpoint into the watched folder to its promotion:
- steps:        inside plugin steps (quantize ...)
- runtime:      the runtime plugins' conversions (export to ONNX / torch.export, save)
- measurement:  the measure phase (load, quality, timed runs)
- loading:      reading the checkpoint (inspect, with its reference outputs, and each build)
- outside:      everything else: detection, hashing, process start, database, waiting
Run: .venv/bin/python bench/bench_demo.py
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timezone

sys.path.insert(0, os.path.dirname(__file__))
from common import Serve, kiln_folder, print_table


def main():
    from modelkiln.config import load_config
    from modelkiln.demo import DEMO_ARCHITECTURE, DEMO_MODEL, drop_checkpoint, stage_dir, train_digits, write_checkpoint
    from modelkiln.store import queries
    from modelkiln.store.db import open_store

    folder = kiln_folder(DEMO_ARCHITECTURE)
    config = load_config(folder / "kiln.toml")
    model, x_eval, y_eval = train_digits()
    serve = Serve(folder)
    try:
        serve.wait_started()
        time.sleep(3)  # the fork server imports torch once at start; not part of a drop
        store = open_store(config)
        staged = stage_dir(config.registry_path, "1")
        write_checkpoint(model, x_eval, y_eval, staged)
        t0 = time.time()
        drop_checkpoint(staged, config.registry_path, DEMO_MODEL, "1")
        while True:
            with store.session() as session:
                promotion = queries.current_promotion(session, DEMO_MODEL, "cpu")
                if promotion is not None:
                    break
            time.sleep(0.01)
        end = promotion.promoted_at.replace(tzinfo=timezone.utc).timestamp()
        total = end - t0
        with store.session() as session:
            (checkpoint,) = queries.checkpoints(session, DEMO_MODEL)
            variants = queries.variants_of(session, checkpoint.id)
            timings = [v.timings or {} for v in variants]
        steps = sum(t.get("step_seconds", 0) for t in timings)
        runtime = sum(t.get("convert_seconds", 0) for t in timings)
        loading = sum(t.get("load_seconds", 0) for t in timings)
        measure = sum(t.get("measure_seconds", 0) for t in timings)
        inspect = float(_inspect_seconds(config, checkpoint))
        inspect += loading
        outside = total - steps - runtime - measure - inspect
        rows = [[name, f"{value:.2f}", f"{value / total:.1%}"] for name, value in (
            ("plugin steps", steps), ("runtime conversion (plugins)", runtime), ("measurement", measure),
            ("loading the checkpoint (inspect, each build)", inspect), ("outside plugins and measurement", outside),
            ("end to end (rename -> promoted)", total))]
        print_table(f"demo: {len(variants)} variants, 1 worker", rows, ["part", "seconds", "share"])
    finally:
        serve.stop()


def _inspect_seconds(config, checkpoint):
    import json

    from modelkiln.daemon.layout import Layout

    path = Layout(config.artifacts_path).reference(checkpoint.model, checkpoint.content_hash) / "inspect.json"
    return json.loads(path.read_text())["seconds"]


if __name__ == "__main__":
    main()
