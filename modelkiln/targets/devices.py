"""Whether this host has a target's devices, answered without importing torch.

The daemon asks at start-up and ``kiln targets`` on every call, so the answer must cost
milliseconds: the NVIDIA device files stand for the GPUs (``CUDA_VISIBLE_DEVICES``
narrows them, as it does for CUDA), and the installed torch's ``version.py`` says
whether it was built with CUDA at all.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path


def nvidia_gpu_count() -> int:
    present = [p for p in Path("/dev").glob("nvidia[0-9]*") if p.name[6:].isdigit()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return len(present)
    if visible.strip() in ("", "-1"):
        return 0
    return min(len(present), len([d for d in visible.split(",") if d.strip()]))


def torch_cuda_version() -> str | None:
    """The CUDA version the installed torch was built with; None for a CPU build."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        text = version_file.read_text()
    except OSError:
        return None
    match = re.search(r"^cuda\s*(?::\s*[^=]+)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return match.group(1) if match else None


def unavailable_reason(device: str, count: int = 1) -> str | None:
    """None when ``count`` devices of kind ``device`` can run here, else why not."""
    kind = device.split(":", 1)[0]
    if kind == "cpu":
        return None
    if kind != "cuda":
        return f"unknown device {device!r} (cpu or cuda)"
    gpus = nvidia_gpu_count()
    if gpus == 0:
        return "no NVIDIA GPU on this host"
    if gpus < count:
        return f"the target needs {count} GPUs; this host has {gpus}"
    if torch_cuda_version() is None:
        return "the installed torch is a CPU build; install a CUDA build of torch on this host"
    return None


def target_unavailable_reason(target, runtimes: dict) -> str | None:
    """None when this host can serve ``target`` (a ``TargetConfig``) with the installed
    ``runtimes`` (name -> Runtime), else why not."""
    # Whether the hardware is here (once per target), then whether each runtime serves it.
    reasons = [unavailable_reason(target.device, target.devices)]
    for name in target.runtimes:
        runtime = runtimes.get(name)
        reasons.append(f"runtime {name} is not installed" if runtime is None
                       else runtime.unavailable_reason(target.device))
    return "; ".join(r for r in reasons if r) or None
