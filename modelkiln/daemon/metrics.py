"""Prometheus ``/metrics``: what the catalogue holds now, and what this daemon has done.

Built with ``prometheus_client``: a collector reads the catalogue at each scrape
(indexed counts and the current promotions only, so a scrape costs the same whatever the
history) beside the standard process and platform collectors. Series:

- gauges of state: checkpoints by status, open jobs by kind and state, per served
  (model, target) the variant's latency and quality and when it was promoted, the age of
  the oldest running job, the queue, the workers, ``kiln_up``, ``kiln_build_info``;
- counters: checkpoints seen and promotions per (model, target), from the catalogue
  (they only grow); jobs this daemon ran that ended, by kind and final state, and their
  durations (a histogram), counted as they end (``JobStats``): per process, as Prometheus
  counters are, so hosts sharing a catalogue each report their own and a query sums them.

Labels are bounded: kinds, states, targets and models (not versions or job ids).
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from ..store import queries, units
from ..targets.host import package_version
from .status import Status, health

# Seconds; jobs range from a baseline export (well under a second) to a distillation.
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class JobStats:
    """The jobs this daemon saw end since it started: how many, by kind and state, and how
    long each took from lease to result."""

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], list] = {}  # -> [count, seconds summed, per-bound counts]

    def observe(self, kind: str, state: str, seconds: float) -> None:
        with self._lock:
            series = self._series.setdefault((kind, state), [0, 0.0, [0] * len(self.bounds)])
            series[0] += 1
            series[1] += seconds
            for n, bound in enumerate(self.bounds):
                series[2][n] += seconds <= bound

    def snapshot(self) -> list[tuple[str, str, int, float, list[int]]]:
        with self._lock:
            return sorted((kind, state, c, total, list(within))
                          for (kind, state), (c, total, within) in self._series.items())


class _Collector:
    """The kiln_* families, read at each scrape."""

    def __init__(self, status):
        self.status = status  # takes the daemon's Status snapshot

    def collect(self) -> Iterator:
        status: Status = self.status()
        yield _build_info()
        if not status.started or status.store is None:
            yield _up(0)
            return
        catalogue = _Catalogue.read(status)
        yield from _checkpoint_families(catalogue)
        yield from _job_families(catalogue, status)
        yield from _promotion_families(catalogue)
        yield from _queue_and_worker_families(catalogue, status)
        yield _up(int(health(status)[0]))


@dataclass
class _Catalogue:
    """What one scrape reads from the catalogue, in one session."""

    by_status: dict[str, int]
    open_jobs: list[tuple[str, str, int]]  # kind, state, count
    promotions: dict[tuple[str, str], int]  # (model, target) -> promotion steps
    oldest_running_seconds: float  # 0: none running
    served: list[tuple]  # model, target, promoted at, p50 seconds, quality

    @classmethod
    def read(cls, status: Status) -> _Catalogue:
        assert status.store is not None  # the caller checked
        with status.store.session() as session:
            by_status = queries.checkpoint_counts(session)
            open_jobs = queries.open_job_counts(session)
            promotions = queries.promotion_counts(session)
            served = queries.current_promotions(session)
            oldest_start = queries.oldest_running_start(session)
            now = units.database_now(session)
            return cls(
                by_status, open_jobs, promotions,
                0.0 if oldest_start is None else max(0.0, (now - oldest_start).total_seconds()),
                [(p.model, p.target, p.promoted_at, _p50_seconds(p.variant, status.objective_batch_size),
                  p.variant.quality) for p in served],
            )


def _build_info():
    from prometheus_client.core import GaugeMetricFamily

    info = GaugeMetricFamily("kiln_build_info", "modelkiln and the runtimes it measures with (value 1).",
                             labels=["version", "python", "torch", "onnxruntime"])
    info.add_metric([package_version("modelkiln"), platform.python_version(), package_version("torch"),
                     package_version("onnxruntime")], 1)
    return info


def _up(value: int):
    from prometheus_client.core import GaugeMetricFamily

    up = GaugeMetricFamily("kiln_up", "1 while /healthz reports ready.")
    up.add_metric([], value)
    return up


def _checkpoint_families(catalogue: _Catalogue) -> Iterator:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    seen = CounterMetricFamily("kiln_checkpoints_seen", "Checkpoints recorded since the catalogue was created.")
    seen.add_metric([], sum(catalogue.by_status.values()))
    yield seen
    checkpoints = GaugeMetricFamily("kiln_checkpoints", "Checkpoints by status.", labels=["status"])
    for name in sorted(catalogue.by_status):
        checkpoints.add_metric([name], catalogue.by_status[name])
    yield checkpoints


def _job_families(catalogue: _Catalogue, status: Status) -> Iterator:
    """Open jobs from the catalogue; the jobs this daemon ran, counted as they ended."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    open_jobs = GaugeMetricFamily("kiln_jobs", "Open jobs in the catalogue, by kind and state (pending, running).",
                                  labels=["kind", "state"])
    for kind, state, count in sorted(catalogue.open_jobs):
        open_jobs.add_metric([kind, state], count)
    yield open_jobs
    oldest = GaugeMetricFamily("kiln_oldest_running_job_seconds",
                               "How long the longest-running job has run (0: none running).")
    oldest.add_metric([], catalogue.oldest_running_seconds)
    yield oldest

    ended_total = CounterMetricFamily("kiln_jobs_ended", "Jobs this daemon ran that ended, by kind and final state.",
                                      labels=["kind", "state"])
    durations = HistogramMetricFamily("kiln_job_duration_seconds",
                                      "Wall time of the jobs this daemon ran, from lease to result.",
                                      labels=["kind", "state"])
    for kind, state, count, total, within in status.jobs_ended:
        ended_total.add_metric([kind, state], count)
        buckets = [(str(bound), n) for bound, n in zip(status.duration_bounds, within)] + [("+Inf", count)]
        durations.add_metric([kind, state], buckets, total)
    yield ended_total
    yield durations


def _promotion_families(catalogue: _Catalogue) -> Iterator:
    """Promotion steps per (model, target), and the served variant's figures."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    promoted = CounterMetricFamily("kiln_promotions", "Promotion steps recorded (rollbacks and pins included).",
                                   labels=["model", "target"])
    for (model, target), count in sorted(catalogue.promotions.items()):
        promoted.add_metric([model, target], count)
    yield promoted
    last = GaugeMetricFamily("kiln_last_promotion_timestamp_seconds",
                             "When the served variant of a (model, target) was promoted, Unix time.",
                             labels=["model", "target"])
    latency = GaugeMetricFamily("kiln_promoted_latency_seconds",
                                "The served variant's p50 latency at the policy's batch size.",
                                labels=["model", "target"])
    quality = GaugeMetricFamily("kiln_promoted_quality", "The served variant's quality score (1: as the original).",
                                labels=["model", "target"])
    for model, target, at, p50, score in catalogue.served:
        last.add_metric([model, target], _unix(at))
        if p50 is not None:
            latency.add_metric([model, target], p50)
        if score is not None:
            quality.add_metric([model, target], score)
    yield last
    yield latency
    yield quality


def _queue_and_worker_families(catalogue: _Catalogue, status: Status) -> Iterator:
    from prometheus_client.core import GaugeMetricFamily

    pending = sum(count for _, state, count in catalogue.open_jobs if state == "pending")
    depth = GaugeMetricFamily("kiln_queue_depth",
                              "Work waiting: pending jobs, versions waiting for their quiet period, unread events.")
    depth.add_metric([], pending + status.versions_waiting + status.unread_events)
    yield depth
    busy = GaugeMetricFamily("kiln_workers_busy", "Worker processes running a job of this daemon.")
    busy.add_metric([], status.workers_busy)
    yield busy
    workers = GaugeMetricFamily("kiln_workers", "Configured worker processes.")
    workers.add_metric([], status.workers)
    yield workers


def _p50_seconds(variant, wanted: int) -> float | None:
    """The variant's p50 at the policy's batch size ``wanted`` (else its smallest), in seconds."""
    measurements = sorted(variant.measurements, key=lambda m: m.batch_size)
    chosen = next((m for m in measurements if m.batch_size == wanted), measurements[0] if measurements else None)
    return None if chosen is None else chosen.latency_p50_ms / 1000


def _unix(naive_utc) -> float:
    from datetime import timezone

    return naive_utc.replace(tzinfo=timezone.utc).timestamp()


def registry_for(status):
    """A collector registry of the daemon's families plus the process and platform ones;
    ``status`` takes the daemon's ``Status`` snapshot at each scrape."""
    from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(status))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def metrics_text(registry) -> bytes:
    """One scrape of a ``registry_for`` registry."""
    from prometheus_client import generate_latest

    return generate_latest(registry)
