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
ends the stop's wait for running jobs (or, before the stop began, interrupts the loop).
All database writes happen on the loop's thread, through the store's units of work.

The rooms the loop calls on, each in its own module:

    jobs.Jobs           a job leased, run, its lease renewed, reaped, recorded, and what
                        its end means for its checkpoint
    ingest.Intake       versions found: to the ingest thread and back, recorded
    hosts.Hosts         hosts sharing the catalogue; what a stopped daemon left
    commands.Commands   what an operator did from the command line
    planner, outcomes   a job's phases; what they produced, recorded
    promoter            the policy's choice, published
    layout.Layout       every path under the artifacts root, and its clean-up
    status.Status       what /healthz and /metrics read (``status()``)
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from dataclasses import replace

from ..plugins.api import FoundCheckpoint
from ..plugins.manager import notify, plugins_for, start_plugins
from ..sizes import format_size
from ..store import queries, units
from ..store.db import open_store
from ..targets.host import cached_probe, describe
from .commands import Commands
from .executor import Executor, worker_memory_limit_mb
from .health import HealthServer
from .hosts import Hosts, check_config
from .ingest import Background, Ingestor, Intake
from .jobs import Jobs
from .layout import Layout
from .outcomes import Outcomes
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
BUSY_WAIT_SECONDS = 0.1
ERROR_BACKOFF_SECONDS = 1.0
STALE_INCOMING_SECONDS = 3600.0


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
        self.watcher: Watcher | None = None
        self.scheduler: Scheduler | None = None
        self.http: HealthServer | None = None
        self.registry_sync: RegistrySync | None = None
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
        check_config(config, self.plugins)
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
        self.intake = Intake(self.ingestor, self.background, self.registry, self.wall_clock)
        self.memory_limit_mb = worker_memory_limit_mb(config.workers.memory_limit_mb, config.workers.count)
        self.executor = Executor(config.workers.count, config.workers.job_timeout_seconds,
                                 memory_limit_mb=self.memory_limit_mb, clock=self.clock,
                                 on_exit=lambda: self.inbox.put(("reap", None)))  # started after the recovery
        self.hosts = Hosts(config, self.store, self.plugins, self.planner, self._settle)
        self.available_targets = self.hosts.available_targets()
        self.jobs = Jobs(config, self.store, self.owner, self.executor, self.planner, self.promoter, self.outcomes,
                         self.layout, self.plugins.manager, self.available_targets, self._sync_soon, self.clock)
        self.commands = Commands(self.store, self.promoter, self.plugins.manager, self.jobs.drop_cancelled,
                                 self._sync_soon)
        self.hosts.join()
        start_plugins(self.plugins.manager, config)
        self._recover()
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
            self.intake.scheduler = scheduler
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

    def _recover(self) -> None:
        """What a stopped daemon left: its jobs, the plans and the checkpoints to settle
        (``hosts.py``), then links and promotions brought in line with the catalogue."""
        with self.store.session() as session:
            self.hosts.recover(session)
            self.promoter.sync_links(session)
            self.commands.seen_promotion = queries.last_promotion_id(session)

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
            self.jobs.reap()
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
            wait = min(wait, max(0.0, self.jobs.next_heartbeat - now), max(0.0, self.executor.next_deadline - now),
                       max(0.0, self._next_operator_check - now))
        return wait

    def run_once(self, timeout: float = 0.0) -> None:
        self.notifier.alive()  # the loop turns: systemd's watchdog, where one is set
        self._drain(timeout)
        self.jobs.reap()
        self._check_operator()
        if not self.stopping:
            self.jobs.lease()
        self.jobs.heartbeat()

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
                self.intake.ingest_later(payload)
            elif kind == "scanned":  # the registry's versions, listed on the ingest thread
                self.intake.scanned(*payload)
            elif kind == "prepared":  # a version copied and hashed on the ingest thread
                self.intake.prepared(*payload)
            elif kind == "expire_leases":
                with self.store.session() as session:
                    units.requeue_expired(session, self.config.workers.max_attempts,
                                          "its lease expired (worker or daemon killed)")
            elif kind == "cleanup":
                self._cleanup()
        if rescan:
            self.background.submit("scanned", "scan", self.registry.scan)
            with self.store.session() as session:
                self.hosts.rescan(session)

    def reconcile(self) -> None:
        """Compare the registry with the catalogue and ingest what events missed, here
        and now (the loop does the same on the ingest thread, at each rescan)."""
        for found in self.registry.scan():
            self.intake.ingest_now(found)

    def ingest_path(self, found: FoundCheckpoint) -> int | None:
        """Take a folder that is known complete now (``kiln optimize``)."""
        return self.intake.ingest_now(replace(found, complete=True))

    def _settle(self, session, checkpoint) -> None:
        self.jobs.settle(session, checkpoint)

    def _sync_soon(self) -> None:
        """A remote registry hears of a promotion now, not at its next poll."""
        if self.scheduler:
            self.scheduler.sync_soon()

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
            jobs_ended=tuple(self.jobs.job_stats.snapshot()), duration_bounds=tuple(self.jobs.job_stats.bounds))

    def _check_operator(self) -> None:
        """Every couple of seconds: restart the file watcher if it died, and act on what an
        operator did from the command line (``commands.py``)."""
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
        self.commands.act(self.executor)

    def _cleanup(self) -> None:
        """Remove what a killed daemon left half-done: staging folders of jobs that are
        not running on any host, and snapshot copies older than an hour (another daemon
        on the same folder may be copying a fresh one right now); and blobs that no
        variant links any more (their folders removed by hand, say)."""
        with self.store.session() as session:
            for staging in self.layout.stagings():
                job_id = self.layout.staging_job(staging)
                job = queries.job_if_any(session, job_id) if job_id is not None else None
                if job is None or job.state != "running":
                    self.layout.remove(staging)
        self.layout.drop_stale_incoming(self.wall_clock() - STALE_INCOMING_SECONDS)
        self.layout.drop_unused_blobs()
