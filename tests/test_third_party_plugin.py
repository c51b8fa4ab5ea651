"""A plugin packaged as third parties package theirs (examples/weight-sharing), installed
into a folder of its own, found through the entry-point group by a daemon started with
that folder on its path, and run as a step of a recipe."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from modelkiln.config import load_config
from modelkiln.store import queries, views
from modelkiln.store.db import open_store

pytestmark = pytest.mark.slow
PACKAGE = Path(__file__).parent.parent / "examples" / "weight-sharing"


@pytest.mark.hooks("kiln_steps")
def test_an_installed_plugin_adds_a_step_the_daemon_runs_and_records(tmp_path, kiln_dir, digits_checkpoint):
    site = tmp_path / "site"
    # Built from a copy: a build writes build/ and *.egg-info next to the sources.
    source = shutil.copytree(PACKAGE, tmp_path / "package", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    assert "weight_sharing" not in {ep.name for ep in entry_points(group="modelkiln")}  # isolated from us

    path = kiln_dir / "kiln.toml"
    text = re.sub(r"(?m)^recipes = \[[^\]]*\]", 'recipes = ["baseline", "share.weights(k=8)"]', path.read_text())
    path.write_text(text.replace('runtimes = ["onnxruntime", "torch"]', 'runtimes = ["torch"]'))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).parent)])}

    def kiln(*args):
        out = subprocess.run([sys.executable, "-m", "modelkiln", *args, "--config", str(path)],
                             capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr
        return out.stdout

    listed = json.loads(kiln("plugins", "--json"))
    (plugin,) = [p for p in listed["plugins"] if p["name"] == "weight_sharing"]
    assert plugin["distribution"] == "kiln-weight-sharing" and "kiln_steps" in plugin["hooks"]
    (step,) = [s for s in listed["steps"] if s["step"] == "share.weights"]
    assert [p["name"] for p in step["params"]] == ["k", "iterations", "min_weights"]

    kiln("optimize", str(digits_checkpoint), "--model", "digits", "--version", "1")
    store = open_store(load_config(path))
    with store.session() as session:
        variants = {v.recipe or "baseline": views.variant_dict(v) for v in queries.variants_of_model(session, "digits")}
    store.dispose()
    shared, baseline = variants["share.weights(k=8)"], variants["baseline"]
    assert shared["status"] == "succeeded", shared.get("reason")
    (record,) = [entry for entry in shared["lineage"] if entry.get("step") == "share.weights"]
    assert record["plugin"] == "weight_sharing"
    assert record["record"]["k"] == 8 and record["record"]["layers"] == 3  # 64->512, 512->512, 512->10
    # The saved program holds uint8 indices, not float weights: well under half the size.
    assert shared["metrics"]["size_bytes"] < 0.45 * baseline["metrics"]["size_bytes"]
    assert shared["metrics"]["quality"] >= baseline["metrics"]["quality"] - 0.05
