"""`kiln demo`: train a small real model, drop it into a watched folder, watch it promoted.

The classifier is a multi-layer perceptron on scikit-learn's digits (shipped with the
package, so nothing is downloaded), trained for a few seconds. ``digits_mlp`` is also
the architecture factory the demo's config names for the safetensors checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

HIDDEN = 512
DEMO_MODEL = "digits"

DEMO_ARCHITECTURE = f"""
# The demo's checkpoint is model.safetensors, built into this module by a factory.
[architectures.{DEMO_MODEL}]
factory = "modelkiln.demo:digits_mlp"
input_shape = [64]
input_dtype = "float32"
"""


def digits_mlp():
    import torch.nn as nn

    return nn.Sequential(
        nn.Linear(64, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, 10),
    )


def digits_data(seed: int = 0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(len(x) * 0.8)
    return (x[:split], y[:split]), (x[split:], y[split:])


def fit_classifier(model, x_train, y_train, epochs: int):
    """Train ``model`` with Adam and cross-entropy in batches of 128; returns it in eval
    mode. Seeding is the caller's: it decides the initial weights too."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(128):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
    return model.eval()


def train_digits(epochs: int = 12, seed: int = 0):
    """Train ``digits_mlp``; returns (module, eval inputs, eval labels)."""
    import torch

    torch.manual_seed(seed)
    (x_train, y_train), (x_eval, y_eval) = digits_data(seed)
    return fit_classifier(digits_mlp(), x_train, y_train, epochs), x_eval, y_eval


def write_checkpoint(model, x_eval, y_eval, directory: Path, train_inputs=None) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    np.savez(directory / "eval.npz", inputs=x_eval, labels=y_eval)
    np.savez(directory / "calibration.npz", inputs=x_eval[:128])
    if train_inputs is not None:
        np.savez(directory / "train.npz", inputs=train_inputs)


def drop_checkpoint(staged: Path, registry: Path, model: str, version: str) -> Path:
    """Rename a fully written folder into place, so the watcher sees it complete at once.

    ``staged`` is a version folder inside a dot-folder of the registry (``stage_dir``).
    For a model the registry already has, the version folder is renamed into the model
    folder; for a new model the whole staging folder becomes the model folder, because a
    folder created an instant before something is renamed into it is not watched yet.
    """
    final = registry / model / version
    if final.parent.is_dir():
        os.rename(staged, final)
        staged.parent.rmdir()
    else:
        if staged.name != version:
            staged = staged.rename(staged.parent / version)
        os.rename(staged.parent, registry / model)
    return final


def stage_dir(registry: Path, version: str = "1") -> Path:
    """A version folder to write a checkpoint into before ``drop_checkpoint``.

    Staging inside the watched root keeps the final rename on one filesystem, and the
    leading dot keeps the registry from taking the half-written folder.
    """
    return registry / f".staging-{uuid.uuid4().hex[:8]}" / version


def next_version(registry: Path, model: str) -> str:
    existing = [int(p.name) for p in (registry / model).glob("*") if p.name.isdigit()]
    return str(max(existing, default=0) + 1)


def run_demo(directory: Path, echo, timeout: float = 600.0, before_stop=None) -> int:
    """Train, serve, drop, and echo each variant and promotion as they come; then
    ``before_stop(config)`` (the CLI prints its table there), then stop the daemon."""
    from .config import load_config, write_default_config
    from .store import queries
    from .store.db import open_store

    config_file = directory / "kiln.toml"
    if not config_file.exists():
        write_default_config(directory, DEMO_ARCHITECTURE)
        # Any free port: another daemon on this host may hold the default one.
        text = config_file.read_text().replace('address = "127.0.0.1:9464"', 'address = "127.0.0.1:0"')
        config_file.write_text(text)
        echo(f"wrote {config_file}")
    config = load_config(config_file)
    started = time.time()
    echo("training a digits classifier (scikit-learn's digits, 64 -> 512 -> 512 -> 10)...")
    model, x_eval, y_eval = train_digits()
    (x_train, _), _ = digits_data()  # what steps that fine-tune train on, apart from eval.npz
    echo(f"  trained in {time.time() - started:.1f} s")
    log_path = directory / "kiln-serve.log"
    echo(f"starting `kiln serve` (log: {log_path})")
    env = {**os.environ, "KILN_CONFIG": str(config_file)}
    with open(log_path, "ab") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "modelkiln", "serve"], env=env,
                                  stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_for_start(log_path, server, timeout=120)
        store = open_store(config)
        registry = config.registry_path
        version = next_version(registry, DEMO_MODEL)
        staged = stage_dir(registry, version)
        write_checkpoint(model, x_eval, y_eval, staged, train_inputs=x_train)
        dropped = time.time()
        final = drop_checkpoint(staged, registry, DEMO_MODEL, version)
        echo(f"dropped checkpoint {final}")
        promotion = _wait_for_promotion(store, queries, version, list(config.targets), server, dropped + timeout,
                                        echo)
        echo(f"every variant ended {time.time() - dropped:.1f} s after the drop\n")
        if before_stop is not None:
            before_stop(config)
        return promotion
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        echo("daemon stopped")


def _news(session, queries, views, checkpoint, told: set[tuple[str, int]]) -> list[str]:
    """Lines for the variants that ended and the promotion steps made since ``told``."""
    lines = []
    for variant in queries.variants_of(session, checkpoint.id):
        if variant.status in ("pending", "running") or ("variant", variant.id) in told:
            continue
        told.add(("variant", variant.id))
        first = variant.measurements[0] if variant.measurements else None
        detail = (f"p50 {first.latency_p50_ms:.3g} ms at batch {first.batch_size}, quality {variant.quality:.4f}"
                  if first is not None and variant.quality is not None else (variant.reason or "")[:80])
        lines.append(f"{variant.target} {views.variant_label(variant)}: {variant.status} ({detail})")
    for promotion in queries.promotions_of(session, checkpoint.id):
        if ("promotion", promotion.id) not in told:
            told.add(("promotion", promotion.id))
            lines.append(f"promoted on {promotion.target}: {views.variant_label(promotion.variant)}")
    return lines


def _wait_for_start(log_path: Path, server, timeout: float) -> None:
    """Until the daemon logs that it started: its workers are warm and it is watching."""
    deadline = time.time() + timeout
    while b"started:" not in log_path.read_bytes():
        if server.poll() is not None:
            lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
            raise RuntimeError(f"`kiln serve` exited early: {lines[-1] if lines else 'no output'} (see {log_path})")
        if time.time() > deadline:
            raise TimeoutError(f"`kiln serve` did not start in {timeout:.0f} s; see {log_path}")
        time.sleep(0.1)


def _wait_for_promotion(store, queries, version: str, targets, server, deadline: float, echo=None) -> int:
    """Until every variant of the dropped version ended; echoes each as it ends and each
    promotion step as it is made."""
    from .store import views

    started = time.time()
    told: set[tuple[str, int]] = set()  # what has been echoed, for _news
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError("`kiln serve` exited before the promotion; see kiln-serve.log")
        with store.session() as session:
            checkpoint = next(
                (c for c in reversed(queries.checkpoints(session, DEMO_MODEL)) if c.version == version), None
            )
            if checkpoint is not None and echo is not None:
                for line in _news(session, queries, views, checkpoint, told):
                    echo(f"  {time.time() - started:5.1f} s  {line}")
            if checkpoint is not None and checkpoint.status in ("rejected", "failed"):
                raise RuntimeError(f"checkpoint {DEMO_MODEL}/{version} {checkpoint.status}: {checkpoint.reason}")
            if checkpoint is not None and checkpoint.status == "done":
                if not any(p.target in targets for p in queries.promotions_of(session, checkpoint.id)):
                    raise RuntimeError(f"{DEMO_MODEL}/{version}: no variant met the policy; see `kiln variants {DEMO_MODEL}`")
                return checkpoint.id
        time.sleep(0.2)
    raise TimeoutError("no promotion before the time limit; see kiln-serve.log and `kiln status`")
