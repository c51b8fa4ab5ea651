"""The MLflow Model Registry as a source of checkpoints, and where promotions are reported.

``poll()`` runs on the scheduler's thread, never on the service loop's: it lists the
versions of the followed registered models and downloads each READY one it has not got
into ``<cache>/<model>/<version>/`` through a dot-folder renamed into place. ``scan()``,
on the loop, therefore only ever sees complete folders, which ingest takes exactly like
directory checkpoints: snapshot, content hash, the same safe loaders. A version whose
files cannot be read safely (a pickled pytorch-flavour model, say) is rejected there,
with the reason, like any other.

Once a version is recorded its download is released: the folder is replaced by a small
file of the same name (``release()``), so a daemon left running does not keep a second
copy of every version ever registered (the snapshot under ``artifacts/`` is what jobs
read), while ``poll()`` still sees that it has the version and ``scan()``, which takes
folders only, passes over it. MLflow model versions do not change once READY, so
nothing is lost by not looking at them again.

``publish()`` writes a promotion back, for the automation that watches the registry:

- the alias ``kiln-<target>`` on the source model's promoted version;
- a version of the derived registered model ``<model>-kiln-<target>`` holding the
  variant's files, tagged with the source version, recipe and headline metrics;
- one run in the ``modelkiln`` experiment with the promoted variant's metrics and a
  child run per variant, so every variant's measurements can be compared in MLflow.

Every part is found by its ``kiln.promotion`` tag before anything is created, so a
publish cut short by a crash or an unreachable server is finished on a later poll and
never doubled. The service calls it for every current promotion after each poll.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from ..files import write_whole
from ..plugins import hookimpl
from ..plugins.api import FoundCheckpoint, PromotionEvent, VariantEvent
from .directory import DirectoryRegistry, valid_name

log = logging.getLogger(__name__)

# MLflow prints a progress bar per download and a link per finished run: noise in a
# service's log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

PROMOTION_TAG = "kiln.promotion"
DERIVED_TAG = "kiln.derived"
STALE_DOWNLOAD_SECONDS = 3600.0
# A released download on its way out (renamed aside, then removed).
RELEASING_PREFIX = ".released-"


def _pages(search, **kwargs) -> list:
    """Every page of an MLflow search (they return PagedList with a token)."""
    items, token = [], None
    while True:
        page = search(page_token=token, **kwargs) if token else search(**kwargs)
        items.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return items


def flat_metrics(metrics: dict | None) -> dict[str, float]:
    """A variant's metrics as MLflow metric keys: headline figures plus one per batch size."""
    out: dict[str, float] = {}
    if not metrics:
        return out
    for key in ("quality", "quality_delta", "size_bytes", "baseline_quality"):
        if isinstance(metrics.get(key), (int, float)):
            out[key] = float(metrics[key])
    for batch in metrics.get("batches") or []:
        b = batch["batch_size"]
        for key in ("latency_p50_ms", "latency_p95_ms", "throughput_per_s", "peak_memory_bytes"):
            if isinstance(batch.get(key), (int, float)):
                out[f"{key}_b{b}"] = float(batch[key])
    for key, value in (metrics.get("decode") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"decode_{key}"] = float(value)
    return out


def plain_number(value: float) -> str:
    """A number as people and MLflow's UI read it: 19599400, 0.000012 (no exponent)."""
    import numpy as np

    return np.format_float_positional(float(value), trim="-")


class MlflowRegistry(DirectoryRegistry):
    kind = "mlflow"
    # Versions arrive by download (a rename into place), announced by poll(): nothing to watch.
    watches = False

    def __init__(self, config) -> None:
        super().__init__(config)
        self.settings = config.registry.mlflow
        self.targets = list(config.targets)
        self.tracking_uri = self.settings.tracking_uri
        self.registry_uri = self.settings.registry_uri or self.tracking_uri
        self.poll_seconds = self.settings.poll_seconds
        self._client = None
        self._published: set[str] = set()
        self._warned: set[str] = set()

    @property
    def client(self):
        if self._client is None:
            # Imported here: mlflow takes seconds to import, and only this kind needs it.
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        return self._client

    def _candidate(self, model: str, version: str, path: Path) -> FoundCheckpoint:
        return FoundCheckpoint(model, version, path, source_uri=f"models:/{model}/{version}", complete=True)

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    # -- versions in ------------------------------------------------------------------

    def followed(self) -> list[str]:
        """Registered model names to follow: the configured names plus the filter's
        matches (every model when neither is set), never a derived model of ours."""
        names = set(self.settings.models)
        if self.settings.filter or not self.settings.models:
            found = _pages(self.client.search_registered_models, filter_string=self.settings.filter or None)
            names.update(m.name for m in found if (m.tags or {}).get(DERIVED_TAG) != "true")
        derived = {self.settings.derived_model.format(model=n, target=t) for n in names for t in self.targets}
        return sorted(names - derived)

    def poll(self) -> int:
        """Download every READY version not in the cache yet; returns how many arrived."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._remove_stale_downloads()
        arrived = 0
        for name in self.followed():
            if not valid_name(name):
                self._warn_once(f"name:{name}", "mlflow: registered model %r is not followed: its name cannot "
                                "be a folder name (letters, digits, . _ + - only)", name)
                continue
            for mv in _pages(self.client.search_model_versions, filter_string=f"name = '{name}'"):
                if mv.status != "READY" or not valid_name(str(mv.version)):
                    continue
                if (self.path / name / str(mv.version)).exists():
                    continue
                try:
                    self._download(name, str(mv.version))
                    arrived += 1
                except Exception as exc:  # the server, the network or the disk: next poll retries
                    self._warn_once(f"dl:{name}:{mv.version}:{exc}", "mlflow: cannot download %s version %s "
                                    "(%s); retrying at the next poll", name, mv.version, exc)
        return arrived

    def _download(self, name: str, version: str) -> None:
        import mlflow.artifacts

        staging = self.path / f".download-{uuid.uuid4().hex[:12]}"
        staging.mkdir(parents=True)
        try:
            uri = self.client.get_model_version_download_uri(name, version)
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(staging),
                                                             tracking_uri=self.tracking_uri))
            if local.is_file():  # a version whose source is one file: give it a folder
                folder = staging / "version"
                folder.mkdir()
                local.rename(folder / local.name)
                local = folder
            final = self.path / name / version
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(local, final)  # complete or absent, never half there
            log.info("mlflow: downloaded %s version %s into %s", name, version, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _remove_stale_downloads(self) -> None:
        cutoff = time.time() - STALE_DOWNLOAD_SECONDS
        for leftover in self.path.glob(".download-*"):
            if leftover.stat().st_mtime < cutoff:  # a download cut short by a killed daemon
                shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.path.glob(f"{RELEASING_PREFIX}*"):  # a release cut short
            shutil.rmtree(leftover, ignore_errors=True)

    def release(self, found: FoundCheckpoint) -> None:
        """Free a recorded version's download, leaving a file in its place that says so."""
        folder = found.path
        if not folder.is_dir() or folder.is_symlink() or folder.parent.parent != self.path:
            return
        aside = self.path / f"{RELEASING_PREFIX}{uuid.uuid4().hex[:12]}"
        os.rename(folder, aside)  # gone from scan() at once, whole
        note = {"model": found.model, "version": found.version, "released_at": time.time(),
                "why": "recorded by modelkiln, which keeps its own snapshot; download removed"}
        write_whole(folder, json.dumps(note).encode())
        shutil.rmtree(aside, ignore_errors=True)
        log.info("mlflow: released the download of %s version %s (snapshot kept)", found.model,
                 found.version)

    # -- promotions out ---------------------------------------------------------------

    def publish(self, promotion: PromotionEvent, variants: list[VariantEvent]) -> None:
        """Write one current promotion back to MLflow (once: later calls find it there)."""
        key = str(promotion["id"])
        if key in self._published:
            return
        model, target, version = promotion["model"], promotion["target"], promotion["version"]
        derived = self.settings.derived_model.format(model=model, target=target)
        client = self.client
        self._ensure_derived_model(derived, model, target)
        made = next((v for v in _pages(client.search_model_versions, filter_string=f"name = '{derived}'")
                     if v.tags.get(PROMOTION_TAG) == key), None)
        if made is None:
            run = self._measurement_run(promotion, variants)
            metrics = flat_metrics(promotion.get("metrics"))
            tags = {
                PROMOTION_TAG: key, "kiln.source_model": model, "kiln.source_version": version,
                "kiln.target": target, "kiln.recipe": promotion["recipe"], "kiln.runtime": promotion["runtime"],
                "kiln.file": promotion.get("file") or "",
                **{f"kiln.metric.{k}": plain_number(v) for k, v in metrics.items()},
            }
            made = client.create_model_version(
                derived, source=f"{run.info.artifact_uri}/variant", run_id=run.info.run_id, tags=tags,
                description=f"{promotion['variant']} of {model} version {version}, promoted on {target} "
                            f"by modelkiln ({promotion.get('reason') or 'policy'})",
            )
        # The alias goes where the served variant is: models:/<derived>@kiln-<target> loads
        # what is served. The source version says which derived version serves it.
        alias = self.settings.alias.format(model=model, target=target)
        client.set_registered_model_alias(derived, alias, made.version)
        client.set_model_version_tag(model, version, f"kiln.served.{target}", f"{derived}/{made.version}")
        self._published.add(key)
        log.info("mlflow: published the promotion of %s version %s on %s (%s)", model, version, target, derived)

    def _ensure_derived_model(self, derived: str, model: str, target: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                derived, tags={DERIVED_TAG: "true", "kiln.source_model": model, "kiln.target": target},
                description=f"Variants of {model} promoted by modelkiln for the target {target}.",
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(self.settings.experiment)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(self.settings.experiment)
        except MlflowException:  # created by another daemon meanwhile
            return self.client.get_experiment_by_name(self.settings.experiment).experiment_id

    def _measurement_run(self, promotion: PromotionEvent, variants: list[VariantEvent]):
        """The run holding the variant's files and every variant's measurements; a run
        left unfinished by an interrupted publish is deleted and made again."""
        client = self.client
        experiment = self._experiment_id()
        key = str(promotion["id"])
        runs = _pages(client.search_runs, experiment_ids=[experiment],
                      filter_string=f"tags.`{PROMOTION_TAG}` = '{key}'")
        for run in runs:
            if run.info.status == "FINISHED" and run.data.tags.get("mlflow.parentRunId") is None:
                return run
        for run in runs:
            client.delete_run(run.info.run_id)
        model, target, version = promotion["model"], promotion["target"], promotion["version"]
        run = client.create_run(experiment, run_name=f"{model} v{version} on {target}", tags={
            PROMOTION_TAG: key, "kiln.model": model, "kiln.version": version, "kiln.target": target,
            "kiln.promoted": promotion["variant"],
        })
        run_id = run.info.run_id
        client.log_batch(run_id, params=_params({"recipe": promotion["recipe"], "runtime": promotion["runtime"],
                                                 "source_version": version, "reason": promotion.get("reason")}),
                         metrics=_metrics(flat_metrics(promotion.get("metrics"))))
        client.log_artifacts(run_id, promotion["artifact"], "variant")
        with tempfile.TemporaryDirectory() as tmp:
            table = Path(tmp) / "variants.json"
            table.write_text(json.dumps(variants, indent=2, default=str))
            client.log_artifact(run_id, str(table))
        for variant in variants:
            child = client.create_run(experiment, run_name=variant["variant"], tags={
                "mlflow.parentRunId": run_id, PROMOTION_TAG: key, "kiln.status": variant["status"],
                "kiln.promoted": str(variant["id"] == promotion.get("variant_id")).lower(),
            })
            client.log_batch(child.info.run_id, params=_params({
                "recipe": variant["recipe"], "runtime": variant["runtime"], "status": variant["status"],
                "reason": variant.get("reason"),
            }), metrics=_metrics(flat_metrics(variant.get("metrics"))))
            client.set_terminated(child.info.run_id)
        client.set_terminated(run_id)
        return client.get_run(run_id)


def _params(values: dict) -> list:
    from mlflow.entities import Param

    # MLflow caps parameter values at 6000 characters; reasons can be long.
    return [Param(k, str(v)[:6000]) for k, v in values.items() if v is not None]


def _metrics(values: dict) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, v, now, 0) for k, v in values.items()]


@hookimpl
def kiln_registry_kinds():
    return {"mlflow": MlflowRegistry}
