"""Factories and utilities the tests (and their worker processes) import."""

from __future__ import annotations

import os
import time
from pathlib import Path

from modelkiln.daemon.service import Daemon
from modelkiln.plugins.api import FoundCheckpoint
from modelkiln.store.models import Checkpoint


def tiny_mlp():
    import torch.nn as nn

    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def deep_mlp():
    """Nine Linear layers, 2 MiB of float32 weights, none over 257 KiB: over a 1 MiB budget
    as a whole, within it one layer at a time."""
    import torch.nn as nn

    layers = []
    for _ in range(8):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10))


def ballasted_mlp():
    """tiny_mlp's outputs behind a 512 x 512 matrix product multiplied by zero: slow until
    a step (fault.unballast) drops the ballast."""
    import torch
    import torch.nn as nn

    class Ballasted(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_mlp()
            self.ballast = nn.Parameter(torch.randn(512, 512), requires_grad=False)

        def forward(self, x):
            if self.ballast is None:
                return self.inner(x)
            return self.inner(x) + 0.0 * (self.ballast @ self.ballast @ self.ballast).sum()

    return Ballasted()


def hanging_factory():
    time.sleep(3600)


def crashing_factory():
    os.kill(os.getpid(), 9)


def exiting_factory():
    raise SystemExit(3)


def run_until_done(daemon: Daemon, checkpoint_id: int, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        daemon.run_once(0.05)
        with daemon.store.session() as session:
            checkpoint = session.get(Checkpoint, checkpoint_id)
            if checkpoint.status in ("done", "rejected", "failed", "duplicate"):
                return checkpoint
    raise TimeoutError(f"checkpoint {checkpoint_id} not done in {timeout} s")


def optimize_once(config, folder: Path, model: str, version: str = "1", extra_plugins=(), timeout=120.0):
    """The `kiln optimize` path in-process: returns (daemon stopped, checkpoint)."""
    daemon = Daemon(config, watch=False, schedule=False, extra_plugins=extra_plugins)
    daemon.start()
    try:
        checkpoint_id = daemon.ingest_path(FoundCheckpoint(model, version, folder))
        return run_until_done(daemon, checkpoint_id, timeout)
    finally:
        daemon.stop(5)


def place(staged: Path, registry: Path, model: str, version: str) -> Path:
    """Copy a checkpoint into a staging folder of the registry, then rename it into place."""
    import shutil

    from modelkiln.demo import drop_checkpoint, stage_dir

    staging = stage_dir(registry, version)
    staging.parent.mkdir(parents=True)
    shutil.copytree(staged, staging)
    return drop_checkpoint(staging, registry, model, version)


SEQ, VOCAB, CLASSES = 16, 32, 4


def tiny_transformer(depth: int = 4):
    """A small transformer classifier over token ids: a stack of repeated blocks."""
    import torch
    import torch.nn as nn

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 32)
            self.position = nn.Parameter(torch.zeros(1, SEQ, 32))
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True) for _ in range(depth)
            )
            self.head = nn.Linear(32, CLASSES)

        def forward(self, ids):
            h = self.embed(ids) + self.position
            for block in self.blocks:
                h = block(h)
            return self.head(h.mean(1))

    return Classifier()


def token_task(rows: int, seed: int):
    """Label: which of the first CLASSES token ids occurs most often (learnable, not trivial)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(rows, SEQ)).astype(np.int64)
    counts = np.stack([(ids == c).sum(1) for c in range(CLASSES)], 1) + rng.random((rows, CLASSES)) * 0.1
    return ids, counts.argmax(1).astype(np.int64)


def train_tiny_transformer(steps: int = 300):
    import torch

    torch.manual_seed(0)
    model = tiny_transformer()
    x, y = token_task(4096, seed=1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (128,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
        optimizer.step()
    return model.eval(), x


def greedy_factory():
    import numpy as np

    hoard = np.ones(2 * 1024**3, dtype=np.uint8)  # 2 GiB, touched
    return hoard


def english_text() -> bytes:
    """Some kilobytes of English prose that every Python carries: its modules' docstrings."""
    import argparse
    import collections
    import json
    import logging
    import subprocess
    import textwrap
    import unittest

    modules = (argparse, collections, json, logging, subprocess, textwrap, unittest)
    return "\n\n".join(" ".join(m.__doc__.split()) for m in modules if m.__doc__).encode("ascii", "ignore")


def trained_llama(steps: int = 300, seed: int = 0):
    """A small Llama (bytes as tokens; 2 blocks, 4 query heads in 2 key/value groups)
    trained on ``english_text`` until its next-byte guesses are confident: random weights
    make the top logits nearly tie, which says nothing about greedy tokens. Returns the
    model and the text."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))
    text = english_text()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    window = 64
    for _ in range(steps):
        starts = torch.randint(0, len(data) - window - 1, (32,))
        batch = torch.stack([data[s:s + window + 1] for s in starts.tolist()])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), text


def use_store(kiln_dir: Path, url: str):
    """Point ``kiln_dir``'s config at the database ``url``; the loaded config."""
    path = kiln_dir / "kiln.toml"
    text = path.read_text()
    assert 'url = "kiln.db"' in text
    path.write_text(text.replace('url = "kiln.db"', f'url = "{url}"', 1))
    from modelkiln.config import load_config

    return load_config(path)


def _matches(value, annotation) -> bool:
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is not None:  # list[dict], dict[str, ...]: the container's type is the contract
        return isinstance(value, origin)
    if annotation is int:  # a bool is an int to isinstance, never to a reader of the payload
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def assert_payload(payload: dict, event_type) -> None:
    """``payload`` is what ``event_type`` (a TypedDict of ``modelkiln.plugins.api``)
    promises plugin authors: its required keys, no others, each value of its type."""
    import typing

    hints = typing.get_type_hints(event_type)
    missing = sorted(event_type.__required_keys__ - payload.keys())
    extra = sorted(payload.keys() - hints.keys())
    wrong = {key: (type(value).__name__, hints[key]) for key, value in payload.items()
             if key in hints and not _matches(value, hints[key])}
    assert not (missing or extra or wrong), (
        f"{event_type.__name__}: missing {missing}, not declared {extra}, of the wrong type {wrong}")
