"""Headless Chromium for the report tests: the distribution's own browser (Debian's
``chromium``), a screenshot of a local page.

``.ci/run`` installs it; where it is missing the tests that need it are skipped, unless
``KILN_REQUIRE_CHROMIUM=1`` (set by ``.ci/run``) makes that a failure. The flags keep a
sandboxed CI machine quiet: no sandbox (root), no GPU, and none of the background
connections to Google's hosts, which a closed network refuses many times over.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1")


def binary() -> str | None:
    return next((found for name in NAMES if (found := shutil.which(name))), None)


def screenshot(browser: str, page: Path, png: Path, width: int = 1200, height: int = 1500) -> Path:
    """Render ``page`` in a fresh profile and write what a person would see to ``png``."""
    with tempfile.TemporaryDirectory(prefix="kiln-chromium-") as profile:
        done = subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
             f"--screenshot={png}", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not png.is_file():
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return png


def dom_after_load(browser: str, page: Path, width: int = 1200, height: int = 1500) -> str:
    """The page's DOM once its scripts ran, laid out in the same window as ``screenshot``."""
    with tempfile.TemporaryDirectory(prefix="kiln-chromium-") as profile:
        done = subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "--dump-dom",
             page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout
