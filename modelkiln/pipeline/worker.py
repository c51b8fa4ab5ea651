"""The entry point of a worker process: run one phase, write its result, exit.

The result is written to a file (atomically) rather than sent over a pipe, so a parent
that was killed and restarted can still read what a finished phase left behind, and a
child that dies mid-way leaves no half-written answer.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from ..children import die_with_parent, leave_signals_to_parent, thread_lock_for_progress_bars
from ..errors import CheckpointRejected, StepNotApplicable
from ..files import write_whole

# Modules the fork server imports once, so that each job's process starts warm.
PRELOAD = [
    "numpy",
    "torch",
    # torch.export and the ONNX exporter pull in dynamo and sympy: seconds per process
    # if each job imported them itself.
    "torch.export",
    "torch.onnx",
    "onnx",
    "onnxruntime",
    "onnxruntime.quantization",
    "safetensors.torch",
    # Hugging Face checkpoints: the import alone is seconds per process otherwise.
    "transformers",
    "transformers.modeling_utils",
    "modelkiln.pipeline.phases",
    "modelkiln.pipeline.runoff",
    "modelkiln.registry.formats",
    "modelkiln.targets.onnxrt",
    "modelkiln.targets.torchrt",
    "modelkiln.steps.quantize",
    "modelkiln.steps.prune",
    "modelkiln.steps.distill",
    "modelkiln.steps.shard",
    "modelkiln.steps.compiler",
    "modelkiln.steps.weight_only",
    "modelkiln.steps.smooth",
    "onnxruntime.quantization.matmul_nbits_quantizer",
    "modelkiln.targets.sharded",
    "torch_pruning",
    "modelkiln.pipeline.warm",  # runs one tiny export so that no job pays its first-use cost
]


# What onnxruntime, torch and numpy say when an allocation fails in C++.
_ALLOCATION_FAILED = ("bad_alloc", "Failed to allocate memory", "can't allocate memory", "Unable to allocate",
                      "not enough memory")


def _out_of_memory(phase: str, limit_mb: int) -> str:
    return (f"out of memory at {phase} (the worker's limit is {limit_mb} MiB; workers.memory_limit_mb sets it, "
            "0 for three quarters of the host's memory)")


def ready() -> None:
    """Run once at start-up: it returns when the fork server has preloaded, and this
    host's probe is kept (``targets.host``), before any job needs it."""
    from ..targets.host import host_probe

    host_probe()


def _write_result(path: str, result: dict) -> None:
    write_whole(path, json.dumps(result).encode())


def serve_one(conn) -> None:
    """A spare worker: wait for one phase on ``conn``, run it, and exit."""
    die_with_parent()
    leave_signals_to_parent()
    try:
        request = conn.recv()
    except (EOFError, OSError):  # the daemon stopped or discarded this spare
        os._exit(0)
    phase, spec, result_path, log_path, memory_limit_mb = request  # as the executor's _launch sends it
    run_phase(phase, spec, result_path, log_path, memory_limit_mb, conn=conn)


def run_phase(phase: str, spec: dict, result_path: str, log_path: str, memory_limit_mb: int = 0,
              conn=None) -> None:
    die_with_parent()
    leave_signals_to_parent()
    thread_lock_for_progress_bars()
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    # Libraries write stray files into the working directory (onnxruntime's shape
    # inference leaves a copy of the model, weights and all, when it gives up): they land
    # in the job's scratch folder, which goes with the job, not beside the daemon.
    sys.path[:] = [entry or os.getcwd() for entry in sys.path]
    os.chdir(os.path.dirname(os.path.abspath(log_path)))
    from .footprint import DiskPeak, peak_host_bytes

    # What the phase writes under the artifacts root: the job's folder (this one), the
    # variant's staging folder, an inspection's reference folder. Its sampling thread
    # starts before the address-space limit below, which is the job's own.
    written = [Path(os.getcwd()), *(Path(spec[key]) for key in ("work_dir", "out_dir") if spec.get(key))]
    disk = DiskPeak(written, sample=phase == "build").start()
    # An address-space limit cannot apply to GPU work: CUDA maps far more address space
    # than memory it uses, and a spawned worker has not mapped torch yet.
    if memory_limit_mb and spec.get("target", {}).get("device", "cpu") == "cpu":
        import resource

        # On top of what the process maps already (torch and friends, shared with the
        # fork server): the limit is what the job itself may add.
        with open("/proc/self/statm") as fh:
            mapped = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = mapped + memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from . import progress
    from .phases import build_variant, inspect_checkpoint, measure_variant
    from .runoff import run_off

    progress.start(os.getcwd(), phase)
    # What the job may use in all: steps that train size their batches within it.
    spec = {**spec, "worker_memory_mb": memory_limit_mb}

    phases = {"inspect": inspect_checkpoint, "build": build_variant, "measure": measure_variant, "runoff": run_off}

    if spec.get("threads"):
        import torch

        # The fork server runs single-threaded (no thread pool may exist when it forks);
        # each phase gets the threads its spec grants: the target's, or a worker's share.
        torch.set_num_threads(int(spec["threads"]))
    try:
        result = phases[phase](spec)
    except CheckpointRejected as exc:
        result = {"status": "rejected", "reason": str(exc)}
    except StepNotApplicable as exc:
        result = {"status": "skipped", "reason": str(exc)}
    except MemoryError:
        result = {"status": "failed", "reason": _out_of_memory(phase, memory_limit_mb)}
    except BaseException as exc:  # SystemExit from a plugin fails the job too
        traceback.print_exc()
        result = {"status": "failed", "reason": f"{phase}: {type(exc).__name__}: {exc}"}
    if memory_limit_mb and any(sign in (result.get("reason") or "") for sign in _ALLOCATION_FAILED):
        # onnxruntime and torch allocate in C++: past the limit they raise their own errors.
        result["reason"] = f"{_out_of_memory(phase, memory_limit_mb)}: {result['reason']}"
    # What the phase cost the host at most: resident memory (this process runs this phase
    # only) and bytes newly on disk.
    result["peak_host_bytes"] = peak_host_bytes()
    result["new_disk_bytes"] = disk.stop()
    _write_result(result_path, result)
    log.flush()
    if conn is not None:
        # Tell the daemon now: tearing down a process this size takes a while.
        try:
            conn.send_bytes(b"done")
        except OSError:
            pass
    # Skip interpreter teardown: library atexit hooks are not ours to wait for.
    os._exit(0)
