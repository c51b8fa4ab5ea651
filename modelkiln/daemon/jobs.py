"""A job's way through this daemon: leased, started in a worker, its lease renewed with
what it reports doing, reaped and recorded, and what its end means for its checkpoint.

    lease()          take pending jobs for the free workers, cheapest first; a variant job
                     whose recipe left the config or whose checkpoint's budget is spent ends
                     there with the reason; one whose result is on disk is recorded as it is
    heartbeat()      renew the leases of running jobs, with their progress; log it now and then
    reap()           record the jobs whose workers ended (``outcomes.py``); a result that
                     comes after the lease was lost is discarded
    drop_cancelled() a job an operator cancelled while it ran here
    after_job()      the checkpoint's promotions decided, and it is closed when every job ended
"""

from __future__ import annotations

import logging

from ..pipeline import progress
from ..plugins.manager import notify
from ..policy import budget_spent
from ..sizes import format_duration
from ..store import queries, units, views
from ..store.models import Checkpoint, Job, utcnow
from .executor import Executor
from .layout import Layout
from .logs import about, about_job, job_label
from .metrics import JobStats
from .outcomes import Outcomes, in_source_terms
from .planner import Planner
from .promoter import Promoter

log = logging.getLogger(__name__)

# How often a running job's progress is logged.
PROGRESS_LOG_SECONDS = 60.0


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



def _log_done(session, checkpoint: Checkpoint) -> None:
    """The line that says a checkpoint is finished, and what each target serves."""
    counts: dict[str, int] = {}
    for variant in queries.variants_of(session, checkpoint.id):
        counts[variant.status] = counts.get(variant.status, 0) + 1
    served = [f"{p.target}: {views.variant_label(p.variant)} of version {p.variant.checkpoint.version}"
              for p in queries.current_promotions(session) if p.model == checkpoint.model]
    log.info("%s/%s done: every job ended (%s); serving %s", checkpoint.model, checkpoint.version,
             ", ".join(f"{n} {status}" for status, n in sorted(counts.items())), "; ".join(served) or "nothing",
             extra=about(checkpoint.model, checkpoint.version))


class Jobs:
    def __init__(self, config, store, owner: str, executor: Executor, planner: Planner, promoter: Promoter,
                 outcomes: Outcomes, layout: Layout, manager, available_targets: list[str], sync_soon, clock):
        """:param owner: this daemon's name on the leases it holds.
        :param manager: the plugin manager, told of jobs that end.
        :param sync_soon: tells a remote registry of a promotion soon."""
        self.config = config
        self.store = store
        self.owner = owner
        self.executor = executor
        self.planner = planner
        self.promoter = promoter
        self.outcomes = outcomes
        self.layout = layout
        self.manager = manager
        self.available_targets = available_targets
        self.sync_soon = sync_soon
        self.clock = clock
        self.job_stats = JobStats()
        # job id -> when its progress was last logged
        self.progress_logged: dict[int, float] = {}
        self.next_heartbeat = 0.0

    def lease(self) -> None:
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
                log.info("job %d started: %s", job.id, job_label(session, job), extra=about_job(session, job))
                self.progress_logged[job.id] = self.clock()  # its first progress line after a while
                try:
                    self.executor.submit(job.id, phases, self.layout.job_work(job.id))
                except OSError as exc:
                    log.error("job %d: cannot start a worker process (%s); it goes back to pending", job.id, exc,
                              extra=about_job(session, job))
                    units.release_jobs(session, self.owner, [job.id], f"cannot start a worker: {exc}")

    def _still_wanted(self, session, job: Job) -> bool:
        """Whether a variant job just leased should run: its recipe is still in the config
        and its checkpoint is within its budget; if not, it ends here with the reason."""
        checkpoint = queries.checkpoint(session, job.checkpoint_id)
        reason = self.planner.unwanted_reason(queries.variant_of(session, job))
        if reason is not None:
            units.end_job(session, job, "cancelled", f"cancelled: {reason}")
            log.info("job %d cancelled: %s", job.id, reason, extra=about_job(session, job))
            self.after_job(session, checkpoint, job)
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
        self.after_job(session, checkpoint, job)
        return False

    def reap(self) -> None:
        outcomes = self.executor.poll()
        if not outcomes:
            return
        with self.store.session() as session:
            for outcome in outcomes:
                job = queries.job(session, outcome.job_id)
                if job.state == "cancelled":  # cancelled as it ended: the result is not kept
                    self.drop_cancelled(session, job)
                    continue
                if job.lease_owner != self.owner or job.state != "running":
                    # Our lease expired and another daemon took the job: its result wins.
                    log.warning("job %d ended after its lease was lost; result discarded", job.id,
                                extra=about_job(session, job))
                    continue
                self._finish(session, job, outcome)

    def _finish(self, session, job: Job, outcome) -> None:
        checkpoint = self.outcomes.record(session, job, outcome)
        status = outcome.status if outcome else "existing"
        log.info("job %d ended: %s %s%s", job.id, job_label(session, job), status, _ending(session, job, outcome),
                 extra=about_job(session, job))
        self._ended(session, job)
        if job.kind == "inspect" and checkpoint.status == "ready":  # variants skipped by planning
            for variant in queries.variants_of(session, checkpoint.id):
                if variant.status == "skipped":
                    notify(self.manager, "kiln_variant_ended", variant=views.variant_dict(variant))
        self.after_job(session, checkpoint, job)
        self.layout.drop_job_work(job.id, keep_log=job.state == "failed" and outcome is not None)

    def _ended(self, session, job: Job) -> None:
        """Count a job that ended (/metrics) and tell plugins."""
        self.progress_logged.pop(job.id, None)
        if job.started_at is not None and job.finished_at is not None:
            self.job_stats.observe(job.kind, job.state, max(0.0, (job.finished_at - job.started_at).total_seconds()))
        if job.kind == "variant":
            variant = views.variant_dict(queries.variant_of(session, job))
            notify(self.manager, "kiln_variant_ended", variant=variant)
        if job.state == "failed":
            notify(self.manager, "kiln_job_failed", job=views.job_dict(job))

    def after_job(self, session, checkpoint: Checkpoint, job: Job | None) -> None:
        targets = [job.target] if job is not None and job.target else list(self.config.targets)
        if checkpoint.status == "ready":
            for target in targets:
                if self.promoter.consider(session, checkpoint, target):
                    self.sync_soon()
            if units.close_if_done(session, checkpoint):
                _log_done(session, checkpoint)

    def heartbeat(self) -> None:
        now = self.clock()
        running = self.executor.running_jobs
        if not running or now < self.next_heartbeat:
            return
        self.next_heartbeat = now + self.config.workers.lease_seconds / 3
        reports = {job_id: report for job_id in running if (report := self.executor.progress(job_id)) is not None}
        with self.store.session() as session:
            units.renew_leases(session, self.owner, running, self.config.workers.lease_seconds, reports)
            for job_id, report in reports.items():
                if report.get("activity") and now - self.progress_logged.get(job_id, now) >= PROGRESS_LOG_SECONDS:
                    self.progress_logged[job_id] = now
                    job = queries.job(session, job_id)
                    log.info("job %d: %s%s", job_id, progress.describe(report), _left(report),
                             extra=about_job(session, job))

    def drop_cancelled(self, session, job: Job) -> None:
        """A job cancelled while it ran here: its lease, scratch and staging folders go,
        and its checkpoint moves on without it."""
        log.info("job %d cancelled while running: %s", job.id, job_label(session, job), extra=about_job(session, job))
        units.end_job(session, job, "cancelled", job.reason)  # drops the lease
        self._ended(session, job)
        checkpoint = queries.checkpoint(session, job.checkpoint_id)
        self.layout.drop_job_work(job.id)
        if job.variant is not None:
            self.layout.remove(self.layout.staging(self.layout.variant_of(checkpoint, job.variant), job.id))
        self.after_job(session, checkpoint, job)

    def settle(self, session, checkpoint: Checkpoint) -> None:
        """A ready checkpoint whose jobs ended without this daemon seeing them end."""
        self.after_job(session, checkpoint, None)
