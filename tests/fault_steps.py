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


@hookimpl
def kiln_steps():
    return [Fault("raise", _raise), Fault("hang", _hang), Fault("hoard", _hoard), Fault("kill", _kill),
            Fault("exit", _exit)]
