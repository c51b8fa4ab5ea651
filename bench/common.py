"""Helpers shared by the benchmarks: a kiln folder, a `kiln serve` process, a table."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def kiln_folder(extra: str = "", replacements: dict | None = None) -> Path:
    from modelkiln.config import write_default_config

    folder = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    write_default_config(folder, extra)
    text = (folder / "kiln.toml").read_text()
    for old, new in (replacements or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    (folder / "kiln.toml").write_text(text)
    return folder


class Serve:
    def __init__(self, folder: Path):
        self.folder = folder
        env = {**os.environ, "KILN_CONFIG": str(folder / "kiln.toml"), "PYTHONPATH": str(ROOT / "tests")}
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


def print_table(title: str, rows: list[list], headers: list[str]) -> None:
    from modelkiln.cli import table

    print(f"\n{title}\n")
    print(table(rows, headers))
