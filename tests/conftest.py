"""Shared fixtures: a configured kiln folder with fast measurement settings, and small
real models built in code (nothing is downloaded)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # workers import helpers' factories

from modelkiln.config import load_config, write_default_config

FAST = """
[architectures.digits]
factory = "modelkiln.demo:digits_mlp"
input_shape = [64]

[architectures.tiny]
factory = "helpers:tiny_mlp"
input_shape = [16]
"""


def fast_config_text(extra: str = "") -> str:
    return FAST + extra


@pytest.fixture
def kiln_dir(tmp_path):
    """A folder made by `kiln init`, tuned so measurements take a fraction of a second."""
    write_default_config(tmp_path, fast_config_text())
    text = (tmp_path / "kiln.toml").read_text()
    # Two recipes unless a test asks for more: the default set trains students.
    text = re.sub(r"(?m)^recipes = \[[^\]]*\]", 'recipes = ["baseline", "quantize.int8_dynamic"]', text)
    text = (
        text.replace("warmup_runs = 5", "warmup_runs = 1")
        .replace("min_runs = 20", "min_runs = 5")
        .replace("max_seconds = 3.0", "max_seconds = 0.2")
        .replace("min_seconds = 0.5", "min_seconds = 0.0")
        .replace("decode_batch_sizes = [1, 8, 32]", "decode_batch_sizes = [1, 4]")
        .replace("prefill_tokens = [512, 2048]", "prefill_tokens = [64]")
        .replace("batch_sizes = [1, 8]", "batch_sizes = [1, 4]")
        .replace("quiet_seconds = 2.0", "quiet_seconds = 0.5")
        .replace("lease_seconds = 60.0", "lease_seconds = 6.0")
        # No run-off unless a test asks for one: it adds a job after the variants.
        .replace("runoff_margin = 0.25", "runoff_margin = 0.0")
        # Any free port: tests run several daemons at once.
        .replace('address = "127.0.0.1:9464"', 'address = "127.0.0.1:0"')
    )
    (tmp_path / "kiln.toml").write_text(text)
    return tmp_path


@pytest.fixture
def config(kiln_dir):
    return load_config(kiln_dir / "kiln.toml")


@pytest.fixture(scope="session")
def trained_digits():
    from modelkiln.demo import train_digits

    return train_digits(epochs=4)


def missing_program(requirement: str, what: str):
    """A program the distribution provides is not installed: fail where ``.ci/run`` set
    ``requirement`` (it installs them), skip elsewhere."""
    import os

    if os.environ.get(requirement) == "1":
        pytest.fail(f"{requirement}=1 but no {what} is installed")
    pytest.skip(f"no {what}: .ci/run installs it from the distribution's packages")


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server on loopback for the session (``postgres.py``)."""
    import postgres

    bin_dir = postgres.binaries()
    if bin_dir is None:
        missing_program("KILN_REQUIRE_POSTGRES", "PostgreSQL server (initdb)")
    server = postgres.Server(bin_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def chromium():
    """Headless Chromium's binary (``browser.py``)."""
    import browser

    found = browser.binary()
    if found is None:
        missing_program("KILN_REQUIRE_CHROMIUM", "Chromium")
    return found


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the session's PostgreSQL server."""
    return postgres_server.new_database()


@pytest.fixture(scope="session")
def trained_lm():
    """A small Llama trained on English text (``helpers.trained_llama``), and the text."""
    from helpers import trained_llama

    return trained_llama()


@pytest.fixture
def digits_checkpoint(tmp_path_factory, trained_digits):
    """A complete digits checkpoint folder (safetensors + eval.npz) outside any registry."""
    from modelkiln.demo import write_checkpoint

    folder = tmp_path_factory.mktemp("staged") / "digits"
    write_checkpoint(*trained_digits, folder)
    return folder


def weights_folder(tmp_path_factory, name: str, factory) -> Path:
    """A checkpoint folder holding ``factory()``'s weights (seed 0) as model.safetensors."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("staged") / name
    folder.mkdir()
    save_file(factory().state_dict(), str(folder / "model.safetensors"))
    return folder


@pytest.fixture
def tiny_checkpoint(tmp_path_factory):
    from helpers import tiny_mlp

    return weights_folder(tmp_path_factory, "tiny", tiny_mlp)


@pytest.fixture(autouse=True)
def _no_kiln_config_env(monkeypatch):
    monkeypatch.delenv("KILN_CONFIG", raising=False)


def pytest_report_header(config):
    return f"modelkiln tests; cpus={os.cpu_count()}; numpy {np.__version__}"
