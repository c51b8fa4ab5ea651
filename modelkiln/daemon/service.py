"""The daemon: one loop that reads its inbox, ingests, leases, runs and records.

    start()      open the store (refusing an outdated schema), bind /healthz and
                 /metrics, load and start plugins, recover jobs a killed predecessor
                 left running, repair promoted links, start the worker fork server, the
                 watcher (for registries worth watching) and the scheduler (with the
                 sync of a remote registry), then serve HTTP
    run_once()   drain the inbox (hints, scheduled ticks), reap finished jobs and
                 record them, stop jobs cancelled from the command line, lease new ones
                 (cheapest first; those whose recipe left the config or whose checkpoint's
                 budget is spent end there with the reason), renew leases with what each
                 job reports doing
    stop(t)      stop taking work, let running jobs finish for up to t seconds, hand
                 the rest back to pending, tell plugins, shut everything down

Signal handlers only record the signal; the loop acts on it. A second SIGTERM/SIGINT
ends the stop's wait for running jobs (or, before the stop began, interrupts the loop). All database writes happen on the loop's thread, through the store's
units of work.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from dataclasses import replace
from datetime import timedelta

from ..config import TargetConfig
from ..errors import ConfigError, NotTakenYet
from ..pipeline import progress
from ..plugins.api import FoundCheckpoint
from ..plugins.manager import notify, plugins_for, start_plugins
from ..plugins.recipes import parse_recipe
from ..policy import budget_spent
from ..sizes import format_duration, format_size, printable
from ..store import queries, units, views
from ..store.db import DatabaseBusy, open_store
from ..store.models import Checkpoint, Job, utcnow
from ..targets.devices import target_unavailable_reason
from ..targets.host import cached_probe, describe
from .executor import Executor, worker_memory_limit_mb
from .health import HealthServer
from .ingest import Background, Ingestor, Prepared
from .layout import Layout
from .logs import about
from .metrics import JobStats
from .outcomes import Outcomes, in_source_terms
from .planner import Planner
from .promoter import Promoter
from .scheduler import Scheduler
from .status import Status
from .sync import RegistrySync
from .systemd import Notifier
from .watcher import Watcher

log = logging.getLogger(__name__)

IDLE_WAIT_SECONDS = 5.0
# How often what an operator did from the command line (cancel, promote) is looked for,
# and how often a running job's progress is logged.
OPERATOR_CHECK_SECONDS = 2.0
PROGRESS_LOG_SECONDS = 60.0
BUSY_WAIT_SECONDS = 0.1
ERROR_BACKOFF_SECONDS = 1.0
STALE_INCOMING_SECONDS = 3600.0
# A host that has not said it runs on the catalogue for this long (or three rescans) is
# gone: its target table no longer binds the others.
HOST_SEEN_SECONDS = 600.0


def _left(report: dict) -> str:
    eta = report.get("eta_seconds")
    return f", about {format_duration(eta)} left" if isinstance(eta, (int, float)) and eta >= 0 else ""


def _ending(session, job: Job, outcome) -> str:
    """What a job's end line adds: a measured variant's latency and quality (and why it
    misses the gate, if it does), or the reason it failed or was skipped."""
    if outcome is not None and outcome.reason:  # naming the user's files, not the snapshot
        return f" ({in_source_terms(outcome.reason, queries.checkpoint(session, job.checkpoint_id))})"
    if job.kind != "variant" or job.state != "succeeded":
        return ""
    variant = queries.variant_of(session, job)
    metrics = views.metrics(variant) or {}
    if metrics.get("latency_p50_ms") is None:
        return ""
    first = metrics["batches"][0]["batch_size"] if metrics.get("batches") else 1
    text = (f" (p50 {metrics['latency_p50_ms']:.3f} ms at batch {first}, {metrics['quality_metric']} "
            f"{metrics['quality']:.4f} against {metrics['baseline_quality']:.4f}")
    return text + (f"; {variant.reason})" if variant.reason else ")")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Daemon:
    def __init__(self, config, *, watch: bool = True, schedule: bool = True, extra_plugins=(),
                 clock=time.monotonic, wall_clock=time.time, preload: bool = True):
        self.config = config
        self.watch = watch
        self.schedule = schedule
        self.extra_plugins = extra_plugins
        self.clock = clock
        self.wall_clock = wall_clock
        self.preload = preload
        self.id = uuid.uuid4().hex[:8]
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.inbox: queue.Queue = queue.Queue()
        self.notifier = Notifier()
        self.stopping = False
        self._signals = 0
        self._signal_name = ""
        self._in_stop = False
        self._next_operator_check = 0.0
        self._seen_promotion = 0
        # job id -> when its progress was last logged
        self._progress_logged: dict[int, float] = {}
        # version folder -> why it could not be ingested (logged once until it changes)
        self._failed_takes: dict[str, str] = {}
        self._next_heartbeat = 0.0
        self.watcher: Watcher | None = None
        self.scheduler: Scheduler | None = None
        self.http: HealthServer | None = None
        self.registry_sync: RegistrySync | None = None
        self.job_stats = JobStats()
        self.started = False

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            if self.http:  # free the port: a corrected config is often retried at once
                self.http.stop()
                self.http = None
            raise

    def _start(self) -> None:
        config = self.config
        self.store = open_store(config)
        if config.http.address:  # bound first: a taken port is a config error, before any work starts
            http = self.http = HealthServer(self.status, config.http.address, config.source)
            http.start()  # answers "starting" (503) until the recovery below ends
        self.plugins = plugins_for(config, self.extra_plugins)
        self._check_config()
        self.layout = Layout(config.artifacts_path)
        self.layout.root.mkdir(parents=True, exist_ok=True)
        config.promoted_path.mkdir(parents=True, exist_ok=True)
        self.promoter = Promoter(config, self.plugins.manager, config.promoted_path)
        self.planner = Planner(config, self.plugins, self.layout)
        self.outcomes = Outcomes(self.layout, self.planner, self.promoter)
        self.registry = self.plugins.registry_kinds[config.registry.kind](config)
        self.background = Background(self.inbox)
        self.ingestor = Ingestor(self.store, self.layout, self.plugins.formats, config.registry.quiet_seconds,
                                 config.registry.kind, clock=self.wall_clock,
                                 max_bytes=int(config.registry.max_checkpoint_gb * 2**30))
        self.available_targets = self._available_targets()
        self._join_catalogue()
        start_plugins(self.plugins.manager, config)
        self._recover()
        self.memory_limit_mb = worker_memory_limit_mb(config.workers.memory_limit_mb, config.workers.count)
        self.executor = Executor(config.workers.count, config.workers.job_timeout_seconds,
                                 memory_limit_mb=self.memory_limit_mb, clock=self.clock,
                                 on_exit=lambda: self.inbox.put(("reap", None)))
        self.executor.start(preload=self.preload)
        if self.watch and self.registry.watches:
            watcher = self.watcher = Watcher(self.registry, self.inbox)
            watcher.start()
        if self.registry.poll_seconds > 0:  # versions live elsewhere: poll and publish back
            self.registry_sync = RegistrySync(self.registry, self.store, self.inbox, self.promoter.describe)
        if self.schedule:
            scheduler = self.scheduler = Scheduler(self.id, self.inbox, config.registry.rescan_seconds,
                                                   config.workers.lease_seconds, sync=self.registry_sync,
                                                   sync_seconds=self.registry.poll_seconds)
            scheduler.start()
        self.inbox.put(("rescan", None))
        self.started = True  # /healthz says ok from here; the warm-up below only makes the first job fast
        if self.preload:
            self.executor.warm_up()  # which also probes this host (targets.host) and keeps the result
            probe = cached_probe()
            if probe is not None:
                log.info("this host: %s", describe(probe))
        self.notifier.ready(f"serving: registry {self.registry.path}, targets "
                            f"{', '.join(self.available_targets) or 'none available'}")
        log.info("daemon %s started: registry %s, targets %s, %d worker(s) of at most %s each%s", self.owner,
                 self.registry.path, ", ".join(self.available_targets) or "none available", config.workers.count,
                 format_size(self.memory_limit_mb * 2**20),
                 "" if config.workers.memory_limit_mb else " (a share of this host's memory; workers.memory_limit_mb"
                                                           " sets it)")

    def _check_config(self) -> None:
        file = self.config.source
        kinds = self.plugins.registry_kinds
        if self.config.registry.kind not in kinds:
            raise ConfigError(f"{file}: registry.kind {self.config.registry.kind!r} is not installed "
                              f"(installed: {', '.join(sorted(kinds))})")
        for name, target in self.config.targets.items():
            for runtime in target.runtimes:
                if runtime not in self.plugins.runtimes:
                    raise ConfigError(f"{file}: targets.{name}.runtimes names {runtime!r}, which no "
                                      f"plugin provides (installed: {', '.join(sorted(self.plugins.runtimes))})")
            served = {r: self.plugins.runtimes[r].devices for r in target.runtimes}
            if not any(target.device.split(":", 1)[0] in devices for devices in served.values()):
                raise ConfigError(f"{file}: targets.{name}.device {target.device!r} is served by none of its runtimes ("
                                  + "; ".join(f"{r}: {', '.join(d)}" for r, d in served.items()) + ")")
            for text in target.recipes:
                parse_recipe(text, self.plugins.steps, f"{file}: targets.{name}.recipes")

    def _target_table(self) -> dict:
        return {name: dataclasses.asdict(target) for name, target in sorted(self.config.targets.items())}

    @property
    def _host_key(self) -> str:
        """This daemon's name in the catalogue's ``hosts``: the machine and its config file
        (two daemons of one machine with different configs are two hosts to each other)."""
        return f"{socket.gethostname()}:{self.config.source or 'no config file'}"

    def _join_catalogue(self) -> None:
        """Refuse a target defined otherwise by another host running on this catalogue
        (seen within HOST_SEEN_SECONDS): its variants would be measured two ways and each
        host would cancel the other's recipes. Then record this host's table."""
        mine = self._target_table()
        host = self._host_key
        with self.store.session() as session:
            since = units.database_now(session) - timedelta(seconds=max(HOST_SEEN_SECONDS,
                                                                        3 * self.config.registry.rescan_seconds))
            # A key one host's version does not know yet counts as its default there.
            defaults = dataclasses.asdict(TargetConfig())
            for peer in queries.hosts_seen_since(session, since):
                if peer.name == host:
                    continue
                for name, ours in mine.items():
                    theirs = peer.targets.get(name)
                    if theirs is None:
                        continue
                    here, there = {**defaults, **ours}, {**defaults, **theirs}
                    if there == here:
                        continue
                    differs = "; ".join(f"{key} = {here.get(key)!r} here, {there.get(key)!r} there"
                                        for key in sorted(set(here) | set(there)) if here.get(key) != there.get(key))
                    raise ConfigError(
                        f"{self.config.source}: targets.{name} is defined otherwise by host {peer.name} (machine:"
                        f"config), which runs on this catalogue ({differs}). Hosts sharing a catalogue must define a shared "
                        "target alike: make the two definitions equal, or give this one another name.")
            units.record_host(session, host, mine)

    def _available_targets(self) -> list[str]:
        available = []
        for name, target in self.config.targets.items():
            reason = target_unavailable_reason(target, self.plugins.runtimes)
            if reason:
                log.warning("target %s is unavailable on this host (%s); its jobs wait for a host "
                            "that has it", name, reason)
            else:
                available.append(name)
        return available

    def _recover(self) -> None:
        """Jobs a dead daemon of this host left running go back to pending now, not after
        their lease runs out; then links and promotions are brought in line with the DB."""
        host = socket.gethostname()
        with self.store.session() as session:
            dead = [
                owner for owner in queries.running_owners(session)
                if owner and owner.rsplit(":", 1)[0] == host
                and (int(owner.rsplit(":", 1)[1]) == os.getpid() or not _pid_alive(int(owner.rsplit(":", 1)[1])))
            ]
            if dead:
                n = units.requeue_owned(session, dead, self.config.workers.max_attempts,
                                        "the daemon running it stopped")
                log.info("returned %d job(s) of a stopped daemon to pending", n)
            self._plan_missing(session)
            for checkpoint in queries.checkpoints_with_status(session, "ready"):  # recipes removed since
                self._cancel_unwanted(session, queries.pending_variant_jobs(session, checkpoint.id))
            self._settle(session)
            self.promoter.sync_links(session)
            self._seen_promotion = queries.last_promotion_id(session)

    def _plan_missing(self, session) -> int:
        """Variant jobs for what this host's config asks of checkpoints already inspected
        and not planned yet: recipes or targets added to this config since, or checkpoints
        another host inspected for its own targets (hosts sharing a catalogue may run
        different target tables). A done checkpoint given jobs is ready again, so its
        promotions are decided as they end. One query for the whole catalogue, on start
        and at every rescan; returns how many variants were added."""
        wanted = self.planner.wanted()
        targets = sorted({target for target, _, _ in wanted})
        added = 0
        for checkpoint_id, planned in queries.planned_by_checkpoint(session, ("ready", "done"), targets).items():
            if not wanted - planned:
                continue
            checkpoint = queries.checkpoint(session, checkpoint_id)
            missing = self.planner.plan(session, checkpoint, only_missing=True, planned=planned)
            count = units.add_variants(session, checkpoint.id, missing)
            if count:
                units.reopen(session, checkpoint)
                added += count
                log.info("%s/%s: %d variant(s) planned for %s, added to this host's config or not planned by the "
                         "host that inspected it", checkpoint.model, checkpoint.version, count,
                         ", ".join(sorted({p.target for p in missing})),
                         extra=about(checkpoint.model, checkpoint.version))
        return added

    def _cancel_unwanted(self, session, jobs: list[Job]) -> int:
        """Cancel the pending variant jobs whose recipe or runtime this host's config no
        longer asks for; returns how many."""
        cancelled = 0
        for job in jobs:
            reason = self.planner.unwanted_reason(queries.variant_of(session, job))
            if reason is not None:
                units.cancel_jobs(session, [job], f"cancelled: {reason}")
                log.info("job %d cancelled: %s %s", job.id, views.variant_label(queries.variant_of(session, job)), reason,
                         extra=self._about(session, job))
                cancelled += 1
        return cancelled

    def _settle(self, session) -> None:
        """Decide and close the ready checkpoints whose jobs ended without this daemon
        seeing them end (cancelled from the command line, ended under a killed daemon)."""
        for checkpoint in queries.checkpoints_with_status(session, "ready"):
            self._after_job(session, checkpoint, None)

    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self._signals += 1
            self.stopping = True
            self._signal_name = signal.Signals(signum).name
            if self._signals > 1 and not self._in_stop:
                raise KeyboardInterrupt  # second signal before the stop began: stop now
            # Wake the loop from its idle wait. A thread, because the queue's lock may be
            # held by the very code this handler interrupted.
            threading.Thread(target=self.inbox.put, args=(("wake", None),), daemon=True).start()
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run_forever(self) -> None:
        while not self.stopping:
            try:
                self.run_once(self._wait_seconds())
            except KeyboardInterrupt:
                raise
            except Exception:
                # A database locked past its busy timeout, a full disk, a bug: log it and
                # try again shortly. Work is level-triggered, so nothing is lost by retrying.
                log.exception("the service loop failed; retrying in %.0f s", ERROR_BACKOFF_SECONDS)
                time.sleep(ERROR_BACKOFF_SECONDS)

    def stop(self, timeout: float = 30.0) -> None:
        """Ordered shutdown: stop sources of new work, drain, hand back, close."""
        if not self.started:
            return
        self.stopping = True
        self._in_stop = True
        self.notifier.stopping()
        running = len(self.executor.running_jobs)
        if self._signals > 1:
            timeout = 0.0
        log.info("stopping%s: %d job(s) running%s", f" on {self._signal_name}" if self._signal_name else "", running,
                 f"; they get {timeout:g} s to finish, then go back to pending (a second signal stops now)"
                 if running and timeout > 0 else "")
        # 1. No new hints or ticks.
        self.background.stop()
        if self.watcher:
            self.watcher.stop()
        if self.scheduler:
            self.scheduler.stop()
        # 2. Running jobs may finish and be recorded within the timeout; a second signal
        # ends the wait.
        deadline = self.clock() + timeout
        while self.executor.running_jobs and self.clock() < deadline and self._signals < 2:
            self._reap()
            time.sleep(BUSY_WAIT_SECONDS)
        # 3. What is still running is killed and returned to pending for the next start.
        unfinished = self.executor.stop(0)
        with self.store.session() as session:
            units.release_jobs(session, self.owner, unfinished, "the daemon stopped before it finished")
        notify(self.plugins.manager, "kiln_daemon_stopping")
        if self.http:
            self.http.stop()
            self.http = None
        self.store.dispose()
        self.started = False
        log.info("daemon %s stopped (%d job(s) handed back)", self.owner, len(unfinished))

    # -- the loop ---------------------------------------------------------------------

    def _wait_seconds(self) -> float:
        """Sleep until something can be due: a worker's exit wakes the loop through the
        inbox, so only time-based work (heartbeats, job deadlines, quiet periods) counts."""
        wait = IDLE_WAIT_SECONDS
        if self.executor.running_jobs:
            now = self.clock()
            wait = min(wait, max(0.0, self._next_heartbeat - now), max(0.0, self.executor.next_deadline - now),
                       max(0.0, self._next_operator_check - now))
        return wait

    def run_once(self, timeout: float = 0.0) -> None:
        self.notifier.alive()  # the loop turns: systemd's watchdog, where one is set
        self._drain(timeout)
        self._reap()
        self._check_operator()
        if not self.stopping:
            self._lease()
        self._heartbeat()

    def _drain(self, timeout: float) -> None:
        messages = []
        try:
            messages.append(self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait())
            while True:
                messages.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        rescan = False
        for kind, payload in messages:
            if kind == "rescan":
                rescan = True
            elif kind == "hint":  # a version folder the watcher found, or a quiet period ended
                self._take_later(payload)
            elif kind == "scanned":  # the registry's versions, listed on the ingest thread
                key, versions, error = payload
                self.background.done(key)
                if error is not None:
                    log.error("the %s registry's scan failed: %s", self.registry.kind, error)
                for found in versions or ():
                    self._take_later(found)
            elif kind == "prepared":  # a version copied and hashed on the ingest thread
                self._prepared(*payload)
            elif kind == "expire_leases":
                with self.store.session() as session:
                    units.requeue_expired(session, self.config.workers.max_attempts,
                                          "its lease expired (worker or daemon killed)")
            elif kind == "cleanup":
                self._cleanup()
        if rescan:
            self.background.submit("scanned", "scan", self.registry.scan)
            with self.store.session() as session:
                units.record_host(session, self._host_key, self._target_table())  # still here
                self._plan_missing(session)
                self._settle(session)

    def status(self) -> Status:
        """This daemon as /healthz and /metrics see it, now (on their thread)."""
        if not self.started:
            return Status(started=False, stopping=self.stopping)
        watched = self.watcher is not None or (self.watch and self.registry.watches)
        return Status(
            started=True, stopping=self.stopping, store=self.store, artifacts=self.layout.root,
            ingest_alive=self.background.alive,
            polls_registry=self.registry_sync is not None,
            registry_problem=self.registry_sync.problem if self.registry_sync is not None else None,
            scheduler_alive=(self.scheduler is not None and self.scheduler.alive) if self.schedule else None,
            watcher_alive=(self.watcher is not None and self.watcher.alive) if watched else None,
            # version folders seen but not yet quiet long enough to be taken
            versions_waiting=self.scheduler.planned if self.scheduler else 0,
            unread_events=self.inbox.qsize(), workers_busy=len(self.executor.running_jobs),
            workers=self.config.workers.count, objective_batch_size=self.config.policy.objective_batch_size,
            jobs_ended=tuple(self.job_stats.snapshot()), duration_bounds=tuple(self.job_stats.bounds))

    def reconcile(self) -> None:
        """Compare the registry with the catalogue and ingest what events missed, here
        and now (the loop does the same on the ingest thread, at each rescan)."""
        for found in self.registry.scan():
            self._take(found)

    def ingest_path(self, found: FoundCheckpoint) -> int | None:
        """Take a folder that is known complete now (``kiln optimize``)."""
        return self._take(replace(found, complete=True))

    def _take(self, found: FoundCheckpoint) -> int | None:
        """Ingest ``found`` on this thread."""
        try:
            result = self.ingestor.ingest(found)
        except Exception as exc:  # one bad folder must not stop the scan or the batch
            self._not_taken(found, exc)
            return None
        return self._taken(found, result)

    def _take_later(self, found: FoundCheckpoint) -> None:
        """Copy and hash ``found`` on the ingest thread; ``_prepared`` records it."""
        self.background.submit("prepared", str(found.path), self._prepare, found)

    def _prepare(self, found: FoundCheckpoint):
        """On the ingest thread: the version folder and what preparing it gave (or raised)."""
        try:
            return found, self.ingestor.prepare(found)
        except Exception as exc:  # reported on the loop, naming the folder
            return found, exc

    def _prepared(self, key: str, value, error: Exception | None) -> None:
        self.background.done(key)
        if error is not None:  # not from the ingest itself (that comes back in value): a bug
            log.error("ingesting %s failed: %s", printable(key), error)
            return
        found, prepared = value
        try:
            if isinstance(prepared, Exception):
                raise prepared
            result = self.ingestor.record(prepared) if isinstance(prepared, Prepared) else prepared
        except DatabaseBusy as exc:  # the database busy or away for a moment: soon, not at the rescan
            log.warning("cannot record %s yet (%s); retrying in %.0f s", printable(key), str(exc).splitlines()[0],
                        ERROR_BACKOFF_SECONDS, extra=about(found.model, found.version))
            if self.scheduler is not None:
                self.scheduler.post_at(self.wall_clock() + ERROR_BACKOFF_SECONDS,
                                       f"quiet:{found.model}/{found.version}", "hint", found)
            return
        except Exception as exc:  # as in _take
            self._not_taken(found, exc)
            return
        self._taken(found, result)

    def _not_taken(self, found: FoundCheckpoint, exc: Exception) -> None:
        message = str(exc) if isinstance(exc, (OSError, NotTakenYet)) else f"{type(exc).__name__}: {exc}"
        if self._failed_takes.get(str(found.path)) == message:  # once, not at every rescan
            return
        self._failed_takes[str(found.path)] = message
        if isinstance(exc, NotTakenYet):  # its message names the folder and what to do
            log.warning("not taken yet: %s", printable(message), extra=about(found.model, found.version))
            return
        log.error("cannot ingest %s: %s; it is looked at again at each rescan", printable(str(found.path)),
                  message, extra=about(found.model, found.version))

    def _taken(self, found: FoundCheckpoint, result) -> int | None:
        self._failed_takes.pop(str(found.path), None)
        key = f"quiet:{found.model}/{found.version}"
        if self.scheduler is not None:
            if result.outcome == "wait":  # a second look once its quiet period is over
                self.scheduler.post_at(result.retry_at, key, "hint", replace(found, complete=False))
            else:
                self.scheduler.cancel(key)
        if result.outcome in ("taken", "unchanged"):
            try:
                self.registry.release(found)
            except OSError as exc:  # the copy stays; the next scan tries again
                log.warning("cannot release %s: %s", found.path, exc,
                            extra=about(found.model, found.version))
        return result.checkpoint_id

    def _lease(self) -> None:
        slots = self.executor.free_slots
        if slots <= 0:
            return
        with self.store.session() as session:
            jobs = units.lease_jobs(session, self.owner, self.available_targets, slots,
                                    self.config.workers.lease_seconds)
            for job in jobs:
                if job.kind == "variant" and not self._still_wanted(session, job):
                    continue
                if job.kind == "runoff":  # the promoter's: it chooses the contenders
                    phases = self.promoter.runoff_phases(session, job, self.planner.base_spec(job.checkpoint))
                else:
                    phases = self.planner.phases(session, job)
                if phases is None:  # its result is on disk already (a job repeated after a crash), or
                    # a run-off has no contenders any more
                    self._finish(session, job, None)
                    continue
                log.info("job %d started: %s", job.id, self._label(session, job), extra=self._about(session, job))
                self._progress_logged[job.id] = self.clock()  # its first progress line after a while
                try:
                    self.executor.submit(job.id, phases, self.layout.job_work(job.id))
                except OSError as exc:
                    log.error("job %d: cannot start a worker process (%s); it goes back to pending", job.id, exc,
                              extra=self._about(session, job))
                    units.release_jobs(session, self.owner, [job.id], f"cannot start a worker: {exc}")

    def _still_wanted(self, session, job: Job) -> bool:
        """Whether a variant job just leased should run: its recipe is still in the config
        and its checkpoint is within its budget; if not, it ends here with the reason."""
        checkpoint = queries.checkpoint(session, job.checkpoint_id)
        reason = self.planner.unwanted_reason(queries.variant_of(session, job))
        if reason is not None:
            units.end_job(session, job, "cancelled", f"cancelled: {reason}")
            log.info("job %d cancelled: %s", job.id, reason, extra=self._about(session, job))
            self._after_job(session, checkpoint, job)
            return False
        policy = self.config.policy
        since = queries.ready_since(session, checkpoint.id) if policy.budget_minutes > 0 else None
        reason = budget_spent(policy, since, utcnow())
        if reason is None:
            return True
        units.end_job(session, job, "skipped", reason)
        waiting = queries.pending_variant_jobs(session, checkpoint.id)
        units.skip_jobs(session, waiting, reason)
        log.warning("%s/%s: budget of %g min spent; %d variant job(s) skipped", checkpoint.model,
                    checkpoint.version, policy.budget_minutes, 1 + len(waiting), extra=about(checkpoint.model, checkpoint.version))
        self._after_job(session, checkpoint, job)
        return False

    def _check_operator(self) -> None:
        """Every couple of seconds: restart the file watcher if it died, and act on what an
        operator did from the command line:
        stop the running jobs they cancelled (`kiln cancel`), and announce promotions they
        made by hand (`kiln promote`, `kiln rollback`): the link here brought in line, the
        plugins told (webhook), a remote registry synced."""
        now = self.clock()
        if now < self._next_operator_check:
            return
        self._next_operator_check = now + OPERATOR_CHECK_SECONDS
        if self.watcher is not None and not self.watcher.alive and not self.stopping:
            log.error("the file watcher stopped (see the traceback above); restarting it, and scanning for what "
                      "it missed")
            try:
                self.watcher.restart()
            except Exception:  # the rescans still find everything; tried again shortly
                log.exception("the file watcher could not be restarted; new versions are found by the rescan "
                              "every %g s meanwhile", self.config.registry.rescan_seconds)
            self.inbox.put(("rescan", None))
        running = self.executor.running_jobs
        with self.store.session() as session:
            for job_id in queries.cancelled_among(session, running):
                self.executor.cancel(job_id)
                self._drop_cancelled(session, queries.job(session, job_id))
            for promotion in queries.promotions_after(session, self._seen_promotion):
                self._seen_promotion = promotion.id
                if not promotion.decision_key.startswith("manual:"):
                    continue  # the policy's, announced by the daemon that decided it
                log.info("promoted %s on %s on an operator's command: %s (%s)", promotion.model, promotion.target,
                         views.variant_label(promotion.variant), promotion.reason,
                         extra=about(promotion.model, None, promotion.target))
                current = queries.current_promotion(session, promotion.model, promotion.target)
                if current is not None and current.id == promotion.id:
                    self.promoter.publish(promotion)
                notify(self.plugins.manager, "kiln_variant_promoted", promotion=self.promoter.describe(promotion))
                if self.scheduler:
                    self.scheduler.sync_soon()

    def _drop_cancelled(self, session, job: Job) -> None:
        """A job cancelled while it ran here: its lease, scratch and staging folders go,
        and its checkpoint moves on without it."""
        log.info("job %d cancelled while running: %s", job.id, self._label(session, job),
                 extra=self._about(session, job))
        units.end_job(session, job, "cancelled", job.reason)  # drops the lease
        self._ended(session, job)
        checkpoint = queries.checkpoint(session, job.checkpoint_id)
        self.layout.drop_job_work(job.id)
        if job.variant is not None:
            self.layout.remove(self.layout.staging(self.layout.variant_of(checkpoint, job.variant), job.id))
        self._after_job(session, checkpoint, job)

    def _reap(self) -> None:
        outcomes = self.executor.poll()
        if not outcomes:
            return
        with self.store.session() as session:
            for outcome in outcomes:
                job = queries.job(session, outcome.job_id)
                if job.state == "cancelled":  # cancelled as it ended: the result is not kept
                    self._drop_cancelled(session, job)
                    continue
                if job.lease_owner != self.owner or job.state != "running":
                    # Our lease expired and another daemon took the job: its result wins.
                    log.warning("job %d ended after its lease was lost; result discarded", job.id,
                                extra=self._about(session, job))
                    continue
                self._finish(session, job, outcome)

    def _finish(self, session, job: Job, outcome) -> None:
        checkpoint = self.outcomes.record(session, job, outcome)
        status = outcome.status if outcome else "existing"
        log.info("job %d ended: %s %s%s", job.id, self._label(session, job), status, _ending(session, job, outcome),
                 extra=self._about(session, job))
        self._ended(session, job)
        if job.kind == "inspect" and checkpoint.status == "ready":  # variants skipped by planning
            for variant in queries.variants_of(session, checkpoint.id):
                if variant.status == "skipped":
                    notify(self.plugins.manager, "kiln_variant_ended", variant=views.variant_dict(variant))
        self._after_job(session, checkpoint, job)
        self.layout.drop_job_work(job.id, keep_log=job.state == "failed" and outcome is not None)

    def _ended(self, session, job: Job) -> None:
        """Count a job that ended (/metrics) and tell plugins."""
        self._progress_logged.pop(job.id, None)
        if job.started_at is not None and job.finished_at is not None:
            self.job_stats.observe(job.kind, job.state, max(0.0, (job.finished_at - job.started_at).total_seconds()))
        if job.kind == "variant":
            variant = views.variant_dict(queries.variant_of(session, job))
            notify(self.plugins.manager, "kiln_variant_ended", variant=variant)
        if job.state == "failed":
            notify(self.plugins.manager, "kiln_job_failed", job=views.job_dict(job))

    def _after_job(self, session, checkpoint: Checkpoint, job: Job | None) -> None:
        targets = [job.target] if job is not None and job.target else list(self.config.targets)
        if checkpoint.status == "ready":
            for target in targets:
                if self.promoter.consider(session, checkpoint, target) and self.scheduler:
                    self.scheduler.sync_soon()  # a remote registry hears of it now
            if units.close_if_done(session, checkpoint):
                self._log_done(session, checkpoint)

    def _log_done(self, session, checkpoint: Checkpoint) -> None:
        """The line that says a checkpoint is finished, and what each target serves."""
        counts: dict[str, int] = {}
        for variant in queries.variants_of(session, checkpoint.id):
            counts[variant.status] = counts.get(variant.status, 0) + 1
        served = [f"{p.target}: {views.variant_label(p.variant)} of version {p.variant.checkpoint.version}"
                  for p in queries.current_promotions(session) if p.model == checkpoint.model]
        log.info("%s/%s done: every job ended (%s); serving %s", checkpoint.model, checkpoint.version,
                 ", ".join(f"{n} {status}" for status, n in sorted(counts.items())), "; ".join(served) or "nothing",
                 extra=about(checkpoint.model, checkpoint.version))

    def _heartbeat(self) -> None:
        now = self.clock()
        running = self.executor.running_jobs
        if not running or now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.config.workers.lease_seconds / 3
        reports = {job_id: report for job_id in running if (report := self.executor.progress(job_id)) is not None}
        with self.store.session() as session:
            units.renew_leases(session, self.owner, running, self.config.workers.lease_seconds, reports)
            for job_id, report in reports.items():
                if report.get("activity") and now - self._progress_logged.get(job_id, now) >= PROGRESS_LOG_SECONDS:
                    self._progress_logged[job_id] = now
                    job = queries.job(session, job_id)
                    log.info("job %d: %s%s", job_id, progress.describe(report), _left(report),
                             extra=self._about(session, job))

    def _cleanup(self) -> None:
        """Remove what a killed daemon left half-done: staging folders of jobs that are
        not running on any host, and snapshot copies older than an hour (another daemon
        on the same folder may be copying a fresh one right now)."""
        with self.store.session() as session:
            for staging in self.layout.stagings():
                job_id = self.layout.staging_job(staging)
                job = queries.job_if_any(session, job_id) if job_id is not None else None
                if job is None or job.state != "running":
                    self.layout.remove(staging)
        self.layout.drop_stale_incoming(self.wall_clock() - STALE_INCOMING_SECONDS)

    @staticmethod
    def _about(session, job: Job) -> dict:
        checkpoint = queries.checkpoint(session, job.checkpoint_id)
        return about(checkpoint.model, checkpoint.version, job.target, job.id)

    @staticmethod
    def _label(session, job: Job) -> str:
        if job.variant_id is None:
            return job.kind
        return f"{job.kind} {views.variant_label(queries.variant(session, job.variant_id))}"
