"""The MLflow registry kind against a real tracking server on loopback (SQLite backend
store, local artifact root), driven through MLflow's own client: nothing is mocked."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from modelkiln.config import load_config
from modelkiln.daemon.service import Daemon
from modelkiln.store import queries
from modelkiln.store.db import open_store

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"the MLflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(30)
    log.close()


def register(client, name: str, folder: Path) -> str:
    """What a training pipeline does: log the files to a run, register them as a version."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException:
        pass
    experiment = client.get_experiment_by_name("training") or client.get_experiment(
        client.create_experiment("training"))
    run = client.create_run(experiment.experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return str(version.version)


def run_until(daemon, condition, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        daemon.run_once(0.1)
        if condition():
            return
    raise TimeoutError("condition not met in time")


def checkpoint_rows(config):
    store = open_store(config)
    try:
        with store.session() as session:
            return {(c.model, c.version): (c.status, c.reason, c.source_uri, c.registry_kind)
                    for c in queries.checkpoints(session)}
    finally:
        store.dispose()


@pytest.mark.hooks("kiln_registry_kinds")
def test_versions_are_pulled_processed_and_promotions_written_back(mlflow_server, kiln_dir, digits_checkpoint):
    from mlflow import MlflowClient

    from test_formats import Evil

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    assert register(client, "digits", digits_checkpoint) == "1"
    evil = Path(tempfile.mkdtemp()) / "evil"
    evil.mkdir()
    marker = kiln_dir / "pwned"
    torch.save({"w": Evil(str(marker))}, evil / "model.pt")
    register(client, "pickled", evil)

    text = (kiln_dir / "kiln.toml").read_text()
    text = text.replace('kind = "directory"', 'kind = "mlflow"').replace('path = "models"', 'path = "mlflow-cache"')
    text = text.replace('tracking_uri = ""', f'tracking_uri = "{mlflow_server}"').replace(
        "poll_seconds = 60.0", "poll_seconds = 2.0")
    (kiln_dir / "kiln.toml").write_text(text)
    config = load_config(kiln_dir / "kiln.toml")

    def aliased():
        """The alias is set and every promotion step is written back (one derived version
        each): promotion is anytime, so the first step comes before the last."""
        try:
            steps = client.search_model_versions("name = 'digits-kiln-cpu'")
            served = client.get_model_version_by_alias("digits-kiln-cpu", "kiln-cpu").version
        except Exception:
            return False
        if int(served) != max(int(v.version) for v in steps):
            return False
        rows = checkpoint_rows(config)
        if rows.get(("digits", "1"), ("",))[0] != "done":
            return False
        store = open_store(config)
        with store.session() as session:
            made = len(queries.promotion_history(session, "digits"))
        store.dispose()
        return len(steps) == made

    daemon = Daemon(config)
    daemon.start()
    try:
        run_until(daemon, lambda: aliased() and checkpoint_rows(config).get(("pickled", "1"), ("",))[0] == "rejected")
    finally:
        daemon.stop(5)

    rows = checkpoint_rows(config)
    assert rows[("digits", "1")][0] == "done"
    # Recorded versions' downloads are released: a note stays where each folder was, so
    # they are neither downloaded nor ingested again; the snapshots hold the files.
    cache = kiln_dir / "mlflow-cache"
    for model in ("digits", "pickled"):
        note = cache / model / "1"
        assert note.is_file() and json.loads(note.read_text())["version"] == "1"
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]
    assert daemon.registry.poll() == 0 and daemon.registry.scan() == []
    assert rows[("digits", "1")][2:] == ("models:/digits/1", "mlflow")
    status, reason, _, _ = rows[("pickled", "1")]
    assert "weights-only" in reason and not marker.exists()  # same trust rules as a folder
    assert not any(model.startswith("digits-kiln") for model, _ in rows)  # our own output is not followed

    promoted = json_promoted(config)
    # One derived version per promotion step (anytime promotion); the newest is served.
    versions = client.search_model_versions("name = 'digits-kiln-cpu'")
    derived = max(versions, key=lambda v: int(v.version))
    assert derived.tags["kiln.source_version"] == "1"
    # models:/digits-kiln-cpu@kiln-cpu loads what is served; the source version points to it.
    assert client.get_model_version_by_alias("digits-kiln-cpu", "kiln-cpu").version == derived.version
    assert client.get_model_version("digits", "1").tags["kiln.served.cpu"] == f"digits-kiln-cpu/{derived.version}"
    assert "e+" not in derived.tags["kiln.metric.size_bytes"]  # plain decimal
    assert derived.tags["kiln.recipe"] == promoted["recipe"]
    assert float(derived.tags["kiln.metric.latency_p50_ms_b1"]) == pytest.approx(
        promoted["metrics"]["latency_p50_ms"], rel=1e-4)
    files = Path(client.download_artifacts(derived.run_id, "variant", tempfile.mkdtemp()))
    assert (files / "variant.json").is_file() and (files / promoted["file"]).is_file()

    experiment = client.get_experiment_by_name("modelkiln")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == derived.run_id]
    assert sorted(r.info.run_id for r in parents) == sorted(v.run_id for v in versions)
    assert len(promoted_variants(config)) == 4  # 2 runtimes x 2 recipes
    assert 1 <= len(children) <= 4  # one per variant measured when the step was published
    assert [r.data.tags["kiln.promoted"] for r in children].count("true") == 1

    # A restarted daemon publishes nothing twice, and a version registered while it runs
    # is found by polling (same content as version 1: a duplicate, by the content hash).
    daemon = Daemon(config)
    daemon.start()
    try:
        assert register(client, "digits", digits_checkpoint) == "2"
        run_until(daemon, lambda: ("digits", "2") in checkpoint_rows(config))
        daemon.scheduler.sync_soon()
        time.sleep(3)
    finally:
        daemon.stop(5)
    assert checkpoint_rows(config)[("digits", "2")][0] == "duplicate"
    assert (cache / "digits" / "2").is_file()
    assert len(client.search_model_versions("name = 'digits-kiln-cpu'")) == len(versions)  # nothing twice
    assert len(client.search_runs([experiment.experiment_id])) == len(runs)

    # By hand: promote another variant, then roll back. Each step gets its derived version
    # and the alias follows what the link serves.
    from click.testing import CliRunner

    from modelkiln.cli import main

    def served_by_alias() -> tuple[str, str]:
        tags = client.get_model_version_by_alias("digits-kiln-cpu", "kiln-cpu").tags
        return tags["kiln.runtime"], tags["kiln.recipe"]

    cfg = ["--config", str(kiln_dir / "kiln.toml")]
    before = (promoted["runtime"], promoted["recipe"])
    other = next(f"{v.runtime}:{v.recipe or 'baseline'}" for v in promoted_variants(config)
                 if v.status == "succeeded" and (v.runtime, v.recipe or "baseline") != before)
    for command, expected in ((["promote", "digits", "cpu", other], tuple(other.split(":"))),
                              (["rollback", "digits", "cpu"], before)):
        out = CliRunner().invoke(main, [*command, *cfg])
        assert out.exit_code == 0, out.output
        assert (json_promoted(config)["runtime"], json_promoted(config)["recipe"]) == expected
        daemon = Daemon(config)
        daemon.start()
        try:
            run_until(daemon, lambda expected=expected: served_by_alias() == expected)
        finally:
            daemon.stop(5)


def promoted_variants(config) -> list:
    store = open_store(config)
    try:
        with store.session() as session:
            (promotion,) = queries.current_promotions(session)
            return queries.variants_of(session, promotion.variant.checkpoint_id, "cpu")
    finally:
        store.dispose()


def json_promoted(config) -> dict:
    from modelkiln.store import views

    store = open_store(config)
    try:
        with store.session() as session:
            (promotion,) = queries.current_promotions(session)
            return views.promotion_dict(promotion, "")
    finally:
        store.dispose()


def test_an_mlflow_registry_without_a_tracking_uri_is_a_config_error(kiln_dir):
    from modelkiln.errors import ConfigError

    path = kiln_dir / "kiln.toml"
    path.write_text(path.read_text().replace('kind = "directory"', 'kind = "mlflow"'))
    with pytest.raises(ConfigError, match="registry.mlflow.tracking_uri"):
        load_config(path)


def test_healthz_reports_an_mlflow_registry_that_cannot_be_polled(kiln_dir, monkeypatch):
    from modelkiln.daemon.service import Daemon
    from test_e2e import http_get

    path = kiln_dir / "kiln.toml"
    text = path.read_text().replace('kind = "directory"', 'kind = "mlflow"').replace('path = "models"',
                                                                                       'path = "mlflow-cache"')
    path.write_text(text.replace('tracking_uri = ""', 'tracking_uri = "http://127.0.0.1:9"'))  # nothing listens
    # MLflow's client retries a refused connection for minutes by default.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    daemon = Daemon(load_config(path), watch=False, schedule=False, preload=False)
    daemon.start()
    try:
        url = f"http://{daemon.http.address}/healthz"
        assert json.loads(http_get(url)[1])["checks"]["registry"] == "ok"  # no poll yet
        daemon.registry_sync()
        code, body = http_get(url)
        assert code == 503 and json.loads(body)["checks"]["registry"].startswith("failing: polling failed"), body
    finally:
        daemon.stop(5)
