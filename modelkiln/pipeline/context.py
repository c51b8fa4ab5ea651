"""What every phase reads besides its spec: the plugins, loaded once per process, and
what the inspect phase recorded for the checkpoint (its result and the arrays the
variants are judged on)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from ..plugins.manager import load_plugins

REFERENCE_FILE = "reference.npz"
INSPECT_FILE = "inspect.json"


@functools.lru_cache(maxsize=8)
def cached_plugins(enabled: tuple, disabled: tuple):
    return load_plugins(enabled, disabled)


def plugins_for_spec(spec: dict):
    # Cached per process; the fork server fills the cache for the default lists once
    # (pipeline/warm.py), so a job's process does not rescan entry points.
    return cached_plugins(tuple(spec.get("enabled", ())), tuple(spec.get("disabled", ())))


def reference(spec: dict) -> tuple[dict, dict, dict]:
    """What inspect recorded: its result, the saved arrays, and the sample inputs by name."""
    work = Path(spec["reference_dir"])
    inspected = json.loads((work / INSPECT_FILE).read_text())
    with np.load(work / REFERENCE_FILE, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    samples = {k.split(":", 1)[1]: v for k, v in arrays.items() if k.startswith("input:")}
    return inspected, arrays, samples
