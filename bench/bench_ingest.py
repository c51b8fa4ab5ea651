"""From a checkpoint appearing in the watched folder to its job existing in the database.

Rename path: a fully written folder is renamed into <models>/<model>/<version>.
Quiet path:  files are written straight into the version folder; it is taken once nothing
             has changed for quiet_seconds (2 s by default), so expect ~2 s plus the scan.
Run: .venv/bin/python bench/bench_ingest.py [--drops 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timezone

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import Serve, kiln_folder, print_table


def tiny_onnx(path):
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    torch.onnx.export(model, (torch.randn(2, 16),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}})
    return path.read_bytes()


def job_created_at(store, model, version):
    from sqlalchemy import select

    from modelkiln.store.models import Checkpoint, Job

    with store.session() as session:
        row = session.execute(
            select(Job.created_at).join(Checkpoint, Job.checkpoint_id == Checkpoint.id)
            .where(Checkpoint.model == model, Checkpoint.version == version)
        ).first()
    return row[0].replace(tzinfo=timezone.utc).timestamp() if row else None


def wait_job(store, model, version, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        created = job_created_at(store, model, version)
        if created is not None:
            return created
        time.sleep(0.01)
    raise TimeoutError(f"{model}/{version}: no job after {timeout} s")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--drops", type=int, default=20)
    args = parser.parse_args()
    from modelkiln.config import load_config
    from modelkiln.store.db import open_store

    # Only the baseline recipe, so the jobs that follow each drop stay small.
    folder = kiln_folder(recipes=["baseline"])
    import tempfile
    from pathlib import Path

    scratch = Path(tempfile.mkdtemp())
    template = tiny_onnx(scratch / "m.onnx")
    serve = Serve(folder)
    try:
        serve.wait_started()
        store = open_store(load_config(folder / "kiln.toml"))
        models = folder / "models"
        (models / "bench").mkdir(parents=True, exist_ok=True)
        time.sleep(0.5)
        rename, quiet = [], []
        for i in range(args.drops):
            staged = models / f".staging-{i}"
            staged.mkdir()
            # Each version differs by a byte so none is a duplicate of another.
            (staged / "model.onnx").write_bytes(template)
            (staged / "notes.txt").write_text(str(i))
            t0 = time.time()
            os.rename(staged, models / "bench" / f"r{i}")
            rename.append(wait_job(store, "bench", f"r{i}") - t0)
            time.sleep(0.3)
        for i in range(max(3, args.drops // 4)):
            target = models / "bench" / f"q{i}"
            target.mkdir()
            (target / "model.onnx").write_bytes(template)
            (target / "notes.txt").write_text(f"q{i}")
            t0 = time.time()
            quiet.append(wait_job(store, "bench", f"q{i}") - t0)
        rows = []
        for name, values in (("rename into place", rename), ("written in place (quiet 2 s)", quiet)):
            v = np.asarray(values) * 1000
            rows.append([name, len(v), f"{np.percentile(v, 50):.1f}", f"{np.percentile(v, 95):.1f}", f"{v.max():.1f}"])
        print_table("checkpoint appears -> job exists (ms)", rows, ["path", "drops", "p50", "p95", "max"])
    finally:
        serve.stop()


if __name__ == "__main__":
    main()
