"""A third-party plugin with faulty steps, installed by test_reliability through a
dist-info folder of its own (so the worker processes load it from the entry point)."""

from __future__ import annotations

import os
import signal
import sys
import time

from modelkiln.plugins import hookimpl
from modelkiln.plugins.api import TORCH, Step


class Fault(Step):
    forms = {"torch": TORCH}

    def __init__(self, name, action):
        self.name = f"fault.{name}"
        self.description = f"a step that {name}s"
        self.action = action

    def apply(self, model, params, context):
        self.action()
        return model


def _raise():
    raise RuntimeError("a plugin bug")


def _hang():
    time.sleep(3600)


def _hoard():
    import numpy as np

    return np.ones(4 * 1024**3, dtype=np.uint8)  # 4 GiB, touched


def _kill():
    os.kill(os.getpid(), signal.SIGKILL)


def _exit():
    sys.exit(3)


def _fail_while_marked():
    """Fails while the file named by KILN_TEST_FAULT_MARKER exists: a cause outside the
    checkpoint (a full disk, say) that goes away."""
    marker = os.environ.get("KILN_TEST_FAULT_MARKER")
    if marker and os.path.exists(marker):
        raise OSError(28, "No space left on device")


def _litter():
    """Writes into the working directory, as onnxruntime's shape inference does when it
    gives up: the file must land in the job's scratch folder."""
    with open("stray.bin", "wb") as handle:
        handle.write(b"\0" * 1024)


class Heavy(Step):
    """The model plus a 512 x 512 matrix product whose result is multiplied by zero: the
    same outputs, a millisecond slower per call (torch.export keeps the product)."""

    name = "fault.heavy"
    description = "the same model, made slower"
    forms = {"torch": TORCH}

    def apply(self, model, params, context):
        import torch

        class Slowed(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner
                self.register_buffer("ballast", torch.randn(512, 512))

            def forward(self, x):
                return self.inner(x) + 0.0 * (self.ballast @ self.ballast @ self.ballast).sum()

        return type(model)(model.form, Slowed(model.obj).eval(), model.inputs, dict(model.notes))


class Unballast(Step):
    """Drops the ballast of ``helpers.ballasted_mlp`` (the same outputs, much faster),
    after a couple of seconds' work; planned as costly, so it runs after the baseline."""

    name = "fault.unballast"
    description = "the same model without its ballast"
    forms = {"torch": TORCH}
    relative_cost = 5.0

    def apply(self, model, params, context):
        time.sleep(2)
        model.obj.ballast = None
        return model


@hookimpl
def kiln_steps():
    return [Fault("raise", _raise), Fault("hang", _hang), Fault("hoard", _hoard), Fault("kill", _kill),
            Fault("exit", _exit), Fault("flaky", _fail_while_marked), Fault("litter", _litter), Heavy(),
            Unballast()]
