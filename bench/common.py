"""Helpers shared by the benchmarks: a kiln folder, a `kiln serve` process, a table."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def kiln_folder(extra: str = "", replacements: dict | None = None, recipes: list[str] | None = None) -> Path:
    """A folder made by `kiln init`, with the cpu target's ``recipes`` if given."""
    from modelkiln.config import write_default_config

    folder = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    write_default_config(folder, extra)
    text = (folder / "kiln.toml").read_text().replace('address = "127.0.0.1:9464"', 'address = "127.0.0.1:0"')
    if recipes is not None:
        listed = ", ".join(json.dumps(r) for r in recipes)  # TOML strings: a recipe may quote its parameters
        text = re.sub(r"(?m)^recipes = \[[^\]]*\]", f"recipes = [{listed}]", text)
    for old, new in (replacements or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    (folder / "kiln.toml").write_text(text)
    return folder


class Serve:
    def __init__(self, folder: Path):
        self.folder = folder
        # tests/ for the plugins some benchmarks name; the caller's PYTHONPATH after it, so
        # the daemon imports the modelkiln the caller chose (a worktree, not an installed copy).
        path = os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "KILN_CONFIG": str(folder / "kiln.toml"), "PYTHONPATH": path}
        self.log = open(folder / "serve.log", "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "modelkiln", "serve"], env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT)

    def wait_started(self, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while b"started" not in (self.folder / "serve.log").read_bytes():
            if time.time() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"kiln serve did not start; see {self.folder / 'serve.log'}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


def recipes_config(recipes: list[str], architecture: str) -> Path:
    """A kiln folder whose cpu target runs ``recipes``, with an [architectures] table."""
    return kiln_folder(architecture, recipes=recipes)


def optimize(config, checkpoint_dir: Path, model: str) -> tuple[list[dict], set[int]]:
    """The `kiln optimize` path in-process; returns every variant (as `kiln variants
    --json` prints it) and the ids of the promoted ones."""
    from modelkiln.daemon.service import Daemon
    from modelkiln.plugins.api import FoundCheckpoint
    from modelkiln.store import queries, views
    from modelkiln.store.db import open_store
    from modelkiln.store.models import Checkpoint

    daemon = Daemon(config, watch=False, schedule=False)
    daemon.start()
    try:
        checkpoint_id = daemon.ingest_path(FoundCheckpoint(model, "1", checkpoint_dir))
        while True:
            daemon.run_once(0.1)
            with daemon.store.session() as session:
                if session.get(Checkpoint, checkpoint_id).status in ("done", "rejected", "failed"):
                    break
    finally:
        daemon.stop(5)
    with open_store(config).session() as session:
        variants = [views.variant_dict(v) for v in queries.variants_of_model(session, model)]
        promoted = {p.variant_id for p in queries.current_promotions(session)}
    return variants, promoted


# Standard-library modules whose docstrings give English sentences on every machine.
_DOC_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "fractions", "functools",
    "gzip", "hashlib", "heapq", "http.client", "inspect", "ipaddress", "itertools", "json", "logging",
    "mailbox", "pathlib", "pickle", "queue", "random", "shutil", "statistics", "string", "tarfile",
    "textwrap", "threading", "typing", "unittest", "urllib.parse", "zipfile",
)


def _docstring_sentences(name: str, methods: bool = False) -> set[str]:
    """English sentences of natural lengths (4 to 45 words) from module ``name``'s
    docstrings: the module's and its public names' (and, with ``methods``, their public
    attributes')."""
    import importlib
    import inspect
    import re

    module = importlib.import_module(name)
    docs = [inspect.getdoc(module)]
    for attr in sorted(dir(module)):
        value = getattr(module, attr, None)
        # Submodules come and go with what else was imported: not a fixed set.
        if not attr.startswith("_") and not inspect.ismodule(value):
            docs.append(inspect.getdoc(value))
            if methods and inspect.isclass(value):
                docs += [inspect.getdoc(getattr(value, m, None)) for m in sorted(vars(value)) if not m.startswith("_")]
    found = set()
    for doc in filter(None, docs):
        text = " ".join(line.strip() for line in doc.splitlines()
                        if line.strip() and not line.startswith((" ", ">>>", "-", "*", "..")))
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            words = sentence.split()
            if (4 <= len(words) <= 45 and sentence[0].isupper() and sentence[-1] in ".!?"
                    and "=" not in sentence and "__" not in sentence):
                found.add(sentence)
    return found


def _fixed_order(sentences) -> list:
    import zlib

    return sorted(sentences, key=lambda s: (zlib.crc32(s.encode()), s))


def stdlib_sentences(count: int, offset: int = 0) -> list[str]:
    """``count`` English sentences of natural lengths (4 to 45 words) from the Python
    standard library's docstrings, in a fixed order; ``offset`` gives a disjoint set."""
    ordered = _fixed_order(set().union(*(_docstring_sentences(name) for name in _DOC_MODULES)))
    if len(ordered) < offset + count:
        raise RuntimeError(f"only {len(ordered)} docstring sentences; asked for {offset + count}")
    return ordered[offset:offset + count]


# A text-classification task on every machine: which part of the standard library a
# docstring sentence (its classes' methods' too) comes from.
TOPICS = {
    "concurrency": ("asyncio", "threading", "queue", "concurrent.futures"),
    "numbers": ("statistics", "decimal", "fractions", "random"),
    "files": ("tarfile", "zipfile", "gzip", "shutil", "pathlib"),
    "tooling": ("unittest", "logging", "inspect"),
}


def stdlib_topics() -> list[tuple[str, int]]:
    """(sentence, topic index in TOPICS) pairs, in a fixed order; a sentence found in two
    topics keeps the first."""
    labelled = {}
    for label, modules in enumerate(TOPICS.values()):
        for name in modules:
            for sentence in _docstring_sentences(name, methods=True):
                labelled.setdefault(sentence, label)
    return [(s, labelled[s]) for s in _fixed_order(labelled)]


def encoder_rows(ids):
    """A BERT-style encoder's inputs for token ids of one length: nothing padded."""
    import numpy as np

    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def interleaved(calls: dict, device: str = "cpu", rounds: int = 7, runs: int = 8) -> dict:
    """Median ms per callable, measured in alternating rounds so that every callable sees
    the same machine; timed as the daemon times (``harness.stopwatch``: CUDA events on a
    GPU, each run waited for)."""
    import numpy as np

    from modelkiln.targets.harness import stopwatch

    start, stop = stopwatch(device)
    times = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(3):
            call()
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(runs):
                start()
                call()
                times[name].append(stop())
    return {name: float(np.median(t)) for name, t in times.items()}


def print_table(title: str, rows: list[list], headers: list[str]) -> None:
    from modelkiln.cli import table

    print(f"\n{title}\n")
    print(table(rows, headers))
