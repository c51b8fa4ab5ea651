"""Imported by the worker fork server once at start-up, to pay first-use costs once.

The first ``torch.export`` in a process imports about 1,200 modules (dynamo, sympy,
mpmath) and takes seconds; the next takes a tenth of a second. Running one tiny export,
save and load round trip here, and one TorchScript-based ONNX export, makes every job's
process (a fork of this server) start warm.

Torch runs single-threaded here on purpose: no OpenMP thread pool may exist when the
server forks. Workers set their own thread count.
"""

from __future__ import annotations

import io
import logging
import signal
import sys
import warnings

log = logging.getLogger(__name__)


def _warm_up() -> None:
    import torch

    torch.set_num_threads(1)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    example = (torch.zeros(2, 4),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(module, example, dynamic_shapes=({0: batch},))
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        buffer.seek(0)
        torch.export.load(buffer).module()
        # The TorchScript exporter writes to a file object as well; torch annotates ``f`` as a path.
        torch.onnx.export(module, example, io.BytesIO(), dynamo=False, input_names=["x"],  # type: ignore[arg-type]
                          dynamic_axes={"x": {0: "batch"}})
        torch.jit.trace(module, example)


def _in_fork_server() -> bool:
    # multiprocessing starts its fork server as `python -c "from multiprocessing.forkserver
    # import main; ..."` and imports the preload modules from there.
    return sys.argv[:1] == ["-c"] and "multiprocessing.forkserver" in sys.modules


if _in_fork_server():
    # The fork server ends by itself when the daemon's connection closes; a SIGTERM to the
    # whole group must not kill it, or every running worker would die with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

try:
    _warm_up()
    from .context import cached_plugins

    cached_plugins((), ())
except Exception as exc:  # a slower first job is better than no fork server
    log.warning("worker warm-up failed (%s); jobs will start cold", exc)
