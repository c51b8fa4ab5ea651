"""The SIGKILL campaign: `kill -9` of a served daemon at seeded random moments.

One run: a fresh kiln folder with two targets (onnxruntime and torch on the cpu), a
`kiln serve` process, several checkpoints renamed into the watched folder, and SIGKILLs
at seeded moments, each followed by a restart; then the daemon is left to finish.
Meanwhile a reader thread plays serving code: every few milliseconds it resolves each
promoted link and checks that the folder it points to is complete (``variant.json`` and
the file it names). Afterwards the catalogue must say: every job ended and succeeded,
every checkpoint done, each step of a checkpoint's promotion history once (never the same
variant twice in a row), the newest version promoted on each target, the links
pointing at the newest promotion, and (on SQLite) ``PRAGMA integrity_check`` answering ok.

The catalogue is the default SQLite file, or any database URL (``store_url``: a
PostgreSQL server shared by several hosts); ``daemons = 2`` runs two daemons on the one
catalogue and folder, as two hosts would, each kill striking one of them at random.

``tests/test_reliability.py`` runs two seeds; ``bench/bench_sigkill.py`` runs fifty.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

TESTS = Path(__file__).parent
CHECKPOINTS = 3
KILLS = 3

CONFIG_EXTRA = """
[targets.edge]
device = "cpu"
runtimes = ["torch"]
threads = 1
batch_sizes = [1]
recipes = ["baseline", "quantize.int8_dynamic"]

[architectures.tiny]
factory = "helpers:tiny_mlp"
input_shape = [16]
"""


def campaign_folder(folder: Path, store_url: str | None = None) -> Path:
    from modelkiln.config import write_default_config

    write_default_config(folder, CONFIG_EXTRA)
    path = folder / "kiln.toml"
    text = path.read_text()
    if store_url:
        text = text.replace('url = "kiln.db"', f'url = "{store_url}"', 1)
    text = re.sub(r"(?m)^recipes = \[[^\]]*\]", 'recipes = ["baseline", "quantize.int8_dynamic"]', text, count=1)
    for old, new in (('runtimes = ["onnxruntime", "torch"]', 'runtimes = ["onnxruntime"]'),
                     ("warmup_runs = 5", "warmup_runs = 1"), ("min_runs = 20", "min_runs = 5"),
                     ("max_seconds = 3.0", "max_seconds = 0.2"), ("min_seconds = 0.5", "min_seconds = 0.0"),
                     ("batch_sizes = [1, 8]", "batch_sizes = [1]"), ("quiet_seconds = 2.0", "quiet_seconds = 0.5"),
                     ("lease_seconds = 60.0", "lease_seconds = 6.0"), ("max_attempts = 3", "max_attempts = 20"),
                     ('address = "127.0.0.1:9464"', 'address = ""')):
        assert old in text, old
        text = text.replace(old, new, 1)
    path.write_text(text)
    return path


def stage_checkpoints(folder: Path, seed: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(TESTS))
    from helpers import tiny_mlp

    staged = []
    for i in range(CHECKPOINTS):
        torch.manual_seed(seed * 1000 + i)
        version = folder / "models" / f".staging-{i + 1}" / str(i + 1)
        version.mkdir(parents=True)
        save_file(tiny_mlp().state_dict(), str(version / "model.safetensors"))
        staged.append(version)
    return staged


class Reader(threading.Thread):
    """Serving code polling the promoted links: any incomplete folder is a violation."""

    def __init__(self, promoted: Path):
        super().__init__(daemon=True)
        self.promoted = promoted
        self.violations: list[str] = []
        self.looks = 0
        self.stop_event = threading.Event()

    def run(self):
        while not self.stop_event.is_set():
            for link in self.promoted.glob("*/*"):
                if link.name.startswith("."):
                    continue  # the temporary link being swapped in
                try:
                    folder = Path(os.path.realpath(link))
                    meta = json.loads((folder / "variant.json").read_text())
                    if not (folder / meta["file"]).is_file():
                        self.violations.append(f"{link} -> {folder}: {meta['file']} missing")
                except (OSError, ValueError, KeyError) as exc:
                    if link.is_symlink() or link.exists():
                        self.violations.append(f"{link}: {type(exc).__name__}: {exc}")
                self.looks += 1
            time.sleep(0.005)


def serve(folder: Path, log) -> subprocess.Popen:
    env = {**os.environ, "KILN_CONFIG": str(folder / "kiln.toml"), "PYTHONPATH": str(TESTS)}
    return subprocess.Popen([sys.executable, "-m", "modelkiln", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)


def run_campaign(folder: Path, seed: int, kills: int = KILLS, timeout: float = 240.0,
                 store_url: str | None = None, daemons: int = 1) -> dict:
    """One seeded run; returns what happened and every problem found (``problems``)."""
    rng = random.Random(seed)
    campaign_folder(folder, store_url)
    catalogue = _catalogue(folder)
    staged = stage_checkpoints(folder, seed)
    (folder / "promoted").mkdir(exist_ok=True)
    reader = Reader(folder / "promoted")
    reader.start()
    # Drops spread over the first seconds, kills anywhere in the first 8 s: before the
    # first ingest, mid-export, mid-measurement, mid-promotion.
    events = [(rng.uniform(0.0, 3.0), "drop", i) for i in range(len(staged))]
    events += [(rng.uniform(0.3, 8.0), "kill", k) for k in range(kills)]
    events.sort()
    log = open(folder / "serve.log", "ab")
    running = [serve(folder, log) for _ in range(daemons)]
    started = time.monotonic()
    killed_at = []
    for at, kind, index in events:
        time.sleep(max(0.0, at - (time.monotonic() - started)))
        if kind == "drop":
            final = folder / "models" / "tiny"
            if final.is_dir():
                os.rename(staged[index], final / staged[index].name)
                staged[index].parent.rmdir()
            else:
                os.rename(staged[index].parent, final)
        else:
            victim = rng.randrange(daemons)
            running[victim].send_signal(signal.SIGKILL)
            running[victim].wait(10)
            killed_at.append(round(time.monotonic() - started, 2))
            running[victim] = serve(folder, log)
    problems: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = [d.returncode for d in running if d.poll() is not None]
            if exited:
                problems.append(f"kiln serve exited with {exited[0]}")
                break
            if _settled(catalogue):
                break
            time.sleep(0.25)
        else:
            problems.append(f"not settled after {timeout:.0f} s")
    finally:
        for daemon in running:
            daemon.send_signal(signal.SIGTERM)
        for daemon in running:
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                problems.append("did not stop within 60 s of SIGTERM")
        reader.stop_event.set()
        reader.join(5)
        log.close()
    problems += reader.violations[:10]
    problems += check_catalogue(folder, catalogue)
    catalogue.dispose()
    return {"seed": seed, "kills_at_s": killed_at, "seconds": round(time.monotonic() - started, 1),
            "reader_looks": reader.looks, "problems": problems}


def _catalogue(folder: Path):
    """An engine on the campaign's catalogue, whichever database the config names."""
    from sqlalchemy import create_engine

    from modelkiln.config import load_config

    return create_engine(load_config(folder / "kiln.toml").store_url)


def _settled(catalogue) -> bool:
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    database = catalogue.url.database
    if catalogue.dialect.name == "sqlite" and not Path(database).exists():
        return False  # looking would create the file before the daemon does
    try:
        with catalogue.connect() as conn:
            done = conn.execute(text("SELECT COUNT(*) FROM checkpoints WHERE status = 'done'")).scalar_one()
            open_jobs = conn.execute(text(
                "SELECT COUNT(*) FROM jobs WHERE state IN ('pending', 'running')")).scalar_one()
    except SQLAlchemyError:
        return False  # not created yet, or busy
    return done == CHECKPOINTS and open_jobs == 0


def check_catalogue(folder: Path, catalogue) -> list[str]:
    from sqlalchemy import text

    from modelkiln.registry.directory import version_order

    problems = []
    with catalogue.connect() as conn:
        if catalogue.dialect.name == "sqlite":
            integrity = conn.execute(text("PRAGMA integrity_check")).scalar_one()
            if integrity != "ok":
                problems.append(f"integrity_check: {integrity}")
        checkpoints = conn.execute(text("SELECT id, version, status FROM checkpoints ORDER BY id")).fetchall()
        if len(checkpoints) != CHECKPOINTS or any(status != "done" for _, _, status in checkpoints):
            problems.append(f"checkpoints: {checkpoints}")
        bad_jobs = conn.execute(text("SELECT id, kind, state, reason FROM jobs WHERE state != 'succeeded'")).fetchall()
        if bad_jobs:
            problems.append(f"jobs not succeeded: {bad_jobs}")
        # Anytime promotion: a checkpoint may be promoted several times on a target as
        # better variants are measured, each step once (keys 1..n), never the same variant
        # twice in a row.
        steps: dict[tuple, list] = {}
        for c, t, key, variant in conn.execute(text(
                "SELECT checkpoint_id, target, decision_key, variant_id FROM promotions ORDER BY id")):
            steps.setdefault((c, t), []).append((key, variant))
        for (c, t), made in steps.items():
            if [k for k, _ in made] != [f"auto:{c}:{t}:{n}" for n in range(1, len(made) + 1)] or any(
                    a[1] == b[1] for a, b in zip(made, made[1:])):
                problems.append(f"promotion steps of checkpoint {c} on {t} repeat: {made}")
        # The newest by version, not by ingest order: a version dropped late is still older.
        newest = max(checkpoints, key=lambda row: (version_order(row[1]), row[0]), default=(None,))[0]
        for target in ("cpu", "edge"):
            if not steps.get((newest, target)):
                problems.append(f"newest checkpoint {newest} has no promotion on {target}")
                continue
            (artifact,) = conn.execute(text(
                "SELECT v.artifact_path FROM promotions p JOIN variants v ON v.id = p.variant_id "
                "WHERE p.target = :target ORDER BY p.id DESC LIMIT 1"), {"target": target}).fetchone()
            link = folder / "promoted" / "tiny" / target
            if not os.path.isabs(artifact):  # stored relative to the artifacts folder
                artifact = str(folder / "artifacts" / artifact)
            if not link.is_symlink() or str(link.resolve()) != artifact:
                problems.append(f"{link} does not point at the newest promotion ({artifact})")
    for variant in [v for target in ("cpu", "edge") for v in (folder / "artifacts").glob(f"tiny/*/{target}/*")]:
        if not variant.name.startswith(".") and not (variant / "variant.json").is_file():
            problems.append(f"{variant}: a published variant folder without variant.json")
    return problems
