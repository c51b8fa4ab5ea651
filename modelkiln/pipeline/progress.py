"""What a worker is doing right now, for the daemon to show.

A phase writes ``progress.json`` into its job's folder (atomically, at most once a
second): the phase, the step it is in, and what a long step reported through
``StepContext.progress`` (an activity, "k of n", figures such as the loss and the
seconds left). The daemon reads it with each lease renewal and puts it in the
catalogue, where ``kiln status`` finds it. Steps that report also get a line in the
worker's log at a steady interval, so ``worker.log`` shows a long step advancing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

PROGRESS_FILE = "progress.json"
WRITE_SECONDS = 1.0
LOG_SECONDS = 30.0


class Progress:
    def __init__(self, folder: Path, phase: str, clock=time.monotonic):
        self.path = Path(folder) / PROGRESS_FILE
        self.clock = clock
        self.state: dict = {"phase": phase}
        self._written = self._logged = float("-inf")
        self._write()

    def step(self, name: str) -> None:
        """A recipe step (or a named part of the phase) starts."""
        self.state = {"phase": self.state["phase"], "step": name}
        self._write()

    def __call__(self, activity: str, done: int, total: int, **figures) -> None:
        self.state.update(activity=activity, done=int(done), total=int(total),
                          **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in figures.items()})
        now = self.clock()
        if now - self._logged >= LOG_SECONDS or done >= total:
            self._logged = now
            print(f"progress: {describe(self.state)}", flush=True)
        if now - self._written >= WRITE_SECONDS or done >= total:
            self._write()

    def _write(self) -> None:
        self._written = self.clock()
        temporary = self.path.with_name(f".{PROGRESS_FILE}.tmp")
        try:  # renamed into place (a reader sees a whole file), not synced: it is only shown
            temporary.write_text(json.dumps({**self.state, "at": time.time()}))
            os.replace(temporary, self.path)
        except OSError:  # progress is for showing; a full disk fails the real writes
            pass


_current: Progress | None = None


def start(folder, phase: str) -> Progress:
    """The progress of this process's one phase (a worker runs exactly one)."""
    global _current
    _current = Progress(Path(folder), phase)
    return _current


def current() -> Progress | None:
    return _current


def read(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


def describe(state: dict | None) -> str:
    """One line: "build: prune.structured: recovery fine-tune 40/300 within 71 s, loss 0.0123"."""
    if not state:
        return ""
    parts = [state.get("phase", "")]
    if state.get("step"):
        parts.append(state["step"])
    text = ": ".join(p for p in parts if p)
    if state.get("activity"):
        text += f": {state['activity']} {state.get('done', 0)}/{state.get('total', 0)}"
        if state.get("budget_seconds"):  # it stops at its time budget, whichever comes first
            text += f" within {state['budget_seconds']} s"
        if state.get("loss") is not None:
            text += f", loss {state['loss']:.4g}"
    return text
