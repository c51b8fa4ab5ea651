"""Promises under faults: SIGKILL at seeded moments (a short campaign; bench/bench_sigkill.py
runs fifty seeds), and third-party steps that raise, hang, exhaust memory, kill
themselves or exit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chaos import run_campaign
from modelkiln.config import load_config
from modelkiln.store import queries
from modelkiln.store.db import open_store

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_random_moments_loses_nothing_and_promotes_once(tmp_path, seed):
    result = run_campaign(tmp_path, seed)
    assert result["problems"] == [], result
    assert len(result["kills_at_s"]) == 3 and result["reader_looks"] > 100


FAULTS = {
    "fault.raise": "RuntimeError: a plugin bug",
    "fault.hang": "timed out",
    "fault.hoard": "out of memory",
    "fault.kill": "killed by signal SIGKILL",
    "fault.exit": "SystemExit",
}


def install_entry_point(site: Path, name: str, module: str) -> None:
    """What pip leaves behind for a package with one `modelkiln` entry point."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[modelkiln]\n{name} = {module}\n")


def test_faulty_third_party_steps_fail_their_own_job_only(tmp_path, kiln_dir, tiny_checkpoint):
    site = tmp_path / "site"
    install_entry_point(site, "faults", "fault_steps")
    path = kiln_dir / "kiln.toml"
    recipes = ", ".join(f'"{r}"' for r in ["baseline", *FAULTS])
    text = re.sub(r"(?m)^recipes = \[[^\]]*\]", f"recipes = [{recipes}]", path.read_text())
    for old, new in (('runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]'),
                     ("job_timeout_seconds = 1800.0", "job_timeout_seconds = 8.0"),
                     ("max_attempts = 3", "max_attempts = 1"), ("memory_limit_mb = 0", "memory_limit_mb = 1024")):
        assert old in text
        text = text.replace(old, new)
    path.write_text(text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).parent)])}
    out = subprocess.run([sys.executable, "-m", "modelkiln", "optimize", str(tiny_checkpoint), "--model", "tiny",
                          "--version", "1", "--config", str(path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    store = open_store(load_config(path))
    with store.session() as session:
        variants = {v.recipe or "baseline": (v.status, v.reason) for v in queries.variants_of_model(session, "tiny")}
        promoted = [p.variant.recipe or "baseline" for p in queries.current_promotions(session)]
    store.dispose()
    assert variants["baseline"] == ("succeeded", None) and promoted == ["baseline"]
    for recipe, reason in FAULTS.items():
        status, recorded = variants[recipe]
        assert status == "failed" and reason in recorded, (recipe, recorded)
