"""A catalogue with a long history: start-up, scrapes and `kiln status` must not grow with it.

Builds a catalogue of CHECKPOINTS finished checkpoints (10 models), each with the
variants the `kiln init` config asks for (2 runtimes x 5 recipes: 10 per checkpoint),
one measurement each, an inspect job and a job per variant (11 per checkpoint) and one
promotion step per checkpoint, inserted in bulk into a migrated database: the SQLite
default, then a throwaway PostgreSQL server on loopback (``tests/postgres.py``; skipped
where its binaries are missing). Then, on each:

- `kiln serve`: seconds from the process's start until its port answers (imports, the
  config, the database opened and migrated), then until `/healthz` answers 200 (after
  recovery), and what it answered meanwhile: "refused" before the port is bound, 503
  "starting" during recovery; a hanging connection would be a fault;
- one `/metrics` scrape: the median of 10, ms;
- `kiln status`: wall seconds of the whole command.

Run:  python3 bench/bench_catalogue.py [checkpoints]   (default 10000)
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import print_table

MODELS = 10
RECIPES = ["baseline", "quantize.int8_dynamic", "quantize.int8_static", "quantize.bf16",
           "prune.structured -> quantize.int8_dynamic"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kiln_folder(url: str | None) -> tuple[Path, str]:
    from modelkiln.config import write_default_config

    folder = Path(tempfile.mkdtemp(prefix="kiln-catalogue-"))
    write_default_config(folder)
    text = (folder / "kiln.toml").read_text()
    listed = ", ".join(f'"{r}"' for r in RECIPES)
    text = re.sub(r"(?m)^recipes = \[[^\]]*\]", f"recipes = [{listed}]", text)
    address = f"127.0.0.1:{free_port()}"
    text = text.replace('address = "127.0.0.1:9464"', f'address = "{address}"')
    if url:
        text = text.replace('url = "kiln.db"', f'url = "{url}"', 1)
    (folder / "kiln.toml").write_text(text)
    return folder, address


def build(folder: Path, checkpoints: int) -> float:
    """Insert the history; returns seconds taken."""
    from sqlalchemy import insert

    from modelkiln.config import load_config
    from modelkiln.plugins.manager import plugins_for
    from modelkiln.plugins.recipes import parse_recipe
    from modelkiln.store.db import open_store
    from modelkiln.store.models import Checkpoint, Job, Measurement, Promotion, Variant

    started = time.perf_counter()
    config = load_config(folder / "kiln.toml")
    steps = plugins_for(config).steps
    wanted = sorted((name, runtime, parse_recipe(text, steps).text) for name, target in config.targets.items()
                    for runtime in target.runtimes for text in target.recipes)
    artifact = folder / "artifacts" / "served"
    artifact.mkdir(parents=True)
    (artifact / "variant.json").write_text("{}")
    (artifact / "model.onnx").write_bytes(b"")
    store = open_store(config)
    then = datetime(2026, 1, 1)
    per = len(wanted)
    chunk = 1000
    with store.engine.begin() as connection:
        for first in range(1, checkpoints + 1, chunk):
            ids = range(first, min(first + chunk, checkpoints + 1))
            connection.execute(insert(Checkpoint), [dict(
                id=c, model=f"m{c % MODELS}", version=str(c), registry="directory", source_uri=f"/r/{c}",
                format="safetensors", content_hash=f"{c:064x}", size_bytes=3_000_000_000, fingerprint="f",
                status="done", snapshot_path=f"/s/{c}", retries=0, created_at=then) for c in ids])
            variants = [dict(id=(c - 1) * per + n + 1, checkpoint_id=c, target=t, runtime=r, recipe=rec,
                             status="succeeded", artifact_path=str(artifact), artifact_file="model.onnx",
                             size_bytes=1000, quality_metric="cosine", quality=0.999, baseline_quality=1.0,
                             quality_delta=0.001, created_at=then, finished_at=then)
                        for c in ids for n, (t, r, rec) in enumerate(wanted)]
            connection.execute(insert(Variant), variants)
            connection.execute(insert(Measurement), [dict(
                variant_id=v["id"], batch_size=1, latency_p50_ms=1.0 + v["id"] % 7, latency_p95_ms=2.0,
                throughput_per_s=100.0, peak_memory_bytes=3_000_000_000, runs=20) for v in variants])
            jobs = [dict(key=f"inspect:{c}", kind="inspect", checkpoint_id=c, state="succeeded", attempts=1,
                         created_at=then, started_at=then, finished_at=then + timedelta(seconds=c % 50))
                    for c in ids]
            jobs += [dict(key=f"variant:{v['id']}", kind="variant", checkpoint_id=v["checkpoint_id"],
                          variant_id=v["id"], target=v["target"], state="succeeded", attempts=1, created_at=then,
                          started_at=then, finished_at=then + timedelta(seconds=v["id"] % 700)) for v in variants]
            connection.execute(insert(Job), jobs)
            connection.execute(insert(Promotion), [dict(
                model=f"m{c % MODELS}", target="cpu", variant_id=(c - 1) * per + 1, checkpoint_id=c,
                decision_key=f"auto:{c}:cpu:1", reason="first", promoted_at=then) for c in ids])
    if store.engine.dialect.name == "postgresql":  # ids were given: move the sequences past them
        with store.engine.begin() as connection:
            for table in ("checkpoints", "variants", "measurements", "jobs", "promotions"):
                connection.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT MAX(id) FROM {table}))")
    store.dispose()
    return time.perf_counter() - started


def get(url: str, timeout: float = 5.0) -> tuple[int | str, bytes]:
    """The status code, or "refused" (nothing listening yet) or "timeout" (a hang)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return ("refused" if isinstance(reason, ConnectionRefusedError) else "timeout"), b""


def measure(folder: Path, address: str) -> dict:
    env = {**os.environ, "KILN_CONFIG": str(folder / "kiln.toml")}
    log = open(folder / "serve.log", "wb")
    started = time.perf_counter()
    daemon = subprocess.Popen([sys.executable, "-m", "modelkiln", "serve"], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    answers = set()
    port_open = None
    try:
        while True:
            code, _ = get(f"http://{address}/healthz", timeout=10)
            answers.add(code)
            if port_open is None and code != "refused":
                port_open = time.perf_counter() - started
            if code == 200:
                break
            if daemon.poll() is not None or time.perf_counter() - started > 600:
                raise RuntimeError(f"kiln serve did not become healthy: {(folder / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.05)
        healthy = time.perf_counter() - started
        scrapes = []
        for _ in range(10):
            t0 = time.perf_counter()
            code, body = get(f"http://{address}/metrics", timeout=30)
            scrapes.append((time.perf_counter() - t0) * 1000)
            assert code == 200 and b"kiln_checkpoints_seen_total" in body, body[-500:]
        t0 = time.perf_counter()
        status = subprocess.run([sys.executable, "-m", "modelkiln", "status"], env=env, capture_output=True,
                                text=True, timeout=600)
        status_s = time.perf_counter() - t0
        assert status.returncode == 0, status.stderr
    finally:
        daemon.terminate()
        daemon.wait(60)
        log.close()
    return {"healthy_s": healthy, "port_open_s": port_open, "answers": sorted(str(a) for a in answers if a != "timeout"),
            "hung": "timeout" in answers, "metrics_ms": statistics.median(scrapes), "status_s": status_s}


def main():
    checkpoints = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    rows = []
    databases = [("SQLite", None)]
    import postgres

    server = None
    if postgres.binaries():
        server = postgres.Server(postgres.binaries())
        databases.append(("PostgreSQL 15", server.new_database()))
    try:
        for name, url in databases:
            folder, address = kiln_folder(url)
            built = build(folder, checkpoints)
            print(f"{name}: built in {built:.0f} s", flush=True)
            found = measure(folder, address)
            rows.append([name, f"{found['port_open_s']:.1f}", f"{found['healthy_s']:.1f}",
                         " ".join(map(str, found["answers"])),
                         "yes" if found["hung"] else "no", f"{found['metrics_ms']:.1f}", f"{found['status_s']:.2f}"])
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if server:
            server.stop()
    print_table(f"{checkpoints} checkpoints, {checkpoints * 10} variants, {checkpoints * 11} jobs, {checkpoints} "
                "promotions", rows, ["database", "serve -> port answers (s)", "serve -> /healthz 200 (s)", "/healthz answers meanwhile",
                                     "a probe hung", "/metrics ms (median of 10)", "kiln status s"])


if __name__ == "__main__":
    main()
