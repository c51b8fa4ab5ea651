"""Factories and utilities the tests (and their worker processes) import."""

from __future__ import annotations

import os
import time
from pathlib import Path

from modelkiln.daemon.service import Daemon
from modelkiln.registry.directory import Candidate
from modelkiln.store.models import Checkpoint


def tiny_mlp():
    import torch.nn as nn

    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def hanging_factory():
    time.sleep(3600)


def crashing_factory():
    os.kill(os.getpid(), 9)


def exiting_factory():
    raise SystemExit(3)


def run_until_done(daemon: Daemon, checkpoint_id: int, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        daemon.run_once(0.05)
        with daemon.store.session() as session:
            checkpoint = session.get(Checkpoint, checkpoint_id)
            if checkpoint.status in ("done", "rejected", "failed", "duplicate"):
                return checkpoint
    raise TimeoutError(f"checkpoint {checkpoint_id} not done in {timeout} s")


def optimize_once(config, folder: Path, model: str, version: str = "1", extra_plugins=(), timeout=120.0):
    """The `kiln optimize` path in-process: returns (daemon stopped, checkpoint)."""
    daemon = Daemon(config, watch=False, schedule=False, extra_plugins=extra_plugins)
    daemon.start()
    try:
        checkpoint_id = daemon.ingest_path(Candidate(model, version, folder))
        return run_until_done(daemon, checkpoint_id, timeout)
    finally:
        daemon.stop(5)


def place(staged: Path, registry: Path, model: str, version: str) -> Path:
    """Copy a checkpoint into a staging folder of the registry, then rename it into place."""
    import shutil

    from modelkiln.demo import drop_checkpoint, stage_dir

    staging = stage_dir(registry, version)
    staging.parent.mkdir(parents=True)
    shutil.copytree(staged, staging)
    return drop_checkpoint(staging, registry, model, version)
