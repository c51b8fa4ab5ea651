"""Runs jobs in worker processes, one phase per fresh process, with a time limit.

Processes are forked from a fork server that has imported torch and onnxruntime once,
so a phase starts warm yet shares nothing mutable with the daemon or with other jobs.
Two things keep process management off the critical path: one spare process is always
forked ahead, waiting on a pipe for its phase, and a worker reports "done" on that pipe
once its result is written, before its (slow, large) teardown. Each process still runs
exactly one phase. The executor only runs processes and reports outcomes; what a job
means is the service's business.
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..pipeline import progress, worker
from ..store.states import PHASE_ENDS_JOB
from .layout import WORKER_LOG

log = logging.getLogger(__name__)

# A worker that reported its result gets this long to exit before it is killed.
EXIT_GRACE_SECONDS = 10.0
# A worker that dies without reporting on a disk this close to full most likely died of it.
LOW_DISK_BYTES = 64 * 2**20


@dataclass
class Phase:
    name: str
    spec: dict


@dataclass
class Outcome:
    """What a job's phases produced: ``results`` has one entry per phase that ran."""

    job_id: int
    status: str  # the last phase's status, or "failed"
    results: list[dict] = field(default_factory=list)
    reason: str | None = None


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    watcher: threading.Thread | None = None

    def close(self) -> None:
        # The watcher selects on the pipe; closing it under a live select could leave the
        # thread waiting on a recycled descriptor. It returns at once here: the worker has
        # answered or is dead.
        if self.watcher is not None:
            self.watcher.join(1.0)
        self.conn.close()


@dataclass
class _Running:
    job_id: int
    phases: list[Phase]
    work_dir: Path
    deadline: float
    results: list[dict] = field(default_factory=list)
    index: int = 0
    # Set by Executor._launch, before the job is registered as running.
    worker: _Worker = field(init=False)


# With workers.memory_limit_mb = 0, the workers share this part of the host's memory (or
# of the cgroup's limit, in a container): what is left keeps the daemon, the fork server
# and the rest of the host out of the OOM killer's way.
HOST_MEMORY_SHARE = 0.75


def host_memory_bytes() -> int:
    """Physical memory, or the cgroup's limit where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def worker_memory_limit_mb(configured: int, workers: int) -> int:
    """Each worker's memory limit: ``workers.memory_limit_mb``, or the host's share."""
    if configured > 0:
        return configured
    return int(host_memory_bytes() * HOST_MEMORY_SHARE / max(1, workers) / 2**20)


def _last_words(log_path: Path) -> str:
    """What the log's last line and the disk say about a worker that could not report."""
    words = ""
    try:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            words = f": {lines[-1].strip()[:300]}"
    except OSError:
        pass
    try:
        stat = os.statvfs(log_path.parent)
        if stat.f_bavail * stat.f_frsize < LOW_DISK_BYTES:
            words += (f"; No space left on device: {stat.f_bavail * stat.f_frsize // 1024} KiB free "
                      f"where {log_path.parent} is")
    except OSError:
        pass
    return f"{words}; see {log_path}"


class Executor:
    def __init__(self, slots: int, timeout_seconds: float, memory_limit_mb: int = 0, clock=time.monotonic,
                 on_exit=None):
        """:param on_exit: called (from a helper thread) whenever a worker process ends,
            so the service can sleep until there is something to reap instead of polling."""
        self.on_exit = on_exit
        self.slots = slots
        self.timeout_seconds = timeout_seconds
        self.memory_limit_mb = memory_limit_mb
        self.clock = clock
        self._running: dict[int, _Running] = {}
        self._spare: _Worker | None = None
        # Workers that reported their result and are still exiting: (process, since).
        self._exiting: list[tuple[multiprocessing.process.BaseProcess, float]] = []
        self._context = multiprocessing.get_context("forkserver")  # no server until the first fork

    def start(self, preload: bool = True) -> None:
        if preload:
            self._context.set_forkserver_preload(worker.PRELOAD)
        # Registered after multiprocessing's own exit handler, so it runs first: a worker
        # busy for minutes must never hold the interpreter's exit (multiprocessing joins
        # every child it started), whatever path the daemon left by.
        atexit.register(self.kill_all)

    def warm_up(self) -> None:
        """Start the fork server and wait until it has preloaded (seconds: it imports
        torch and runs one export), so that the first job starts as fast as the rest."""
        process = self._context.Process(target=worker.ready, name="kiln-warm-up")
        process.start()
        process.join()
        self._spare = self._fork()

    @property
    def free_slots(self) -> int:
        return self.slots - len(self._running)

    @property
    def running_jobs(self) -> list[int]:
        return list(self._running)

    def submit(self, job_id: int, phases: list[Phase], work_dir: Path) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        running = _Running(job_id, phases, work_dir, self.clock() + self.timeout_seconds)
        self._launch(running)  # registered only once its process exists
        self._running[job_id] = running

    def _paths(self, running: _Running) -> tuple[Path, Path]:
        phase = running.phases[running.index]
        return (running.work_dir / f"{phase.name}.result.json", running.work_dir / WORKER_LOG)

    def _fork(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=worker.serve_one, args=(child,), name="kiln-worker")
        process.start()
        child.close()
        return _Worker(process, parent)

    def _spawn(self) -> _Worker:
        """A worker started from scratch (imports and all): for phases on a GPU. CUDA
        cannot be used in a process forked from one where it was initialised, and the
        fork server's preloading (torch, its export warm-up) may initialise it."""
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(target=worker.serve_one, args=(child,), name="kiln-gpu-worker")
        process.start()
        child.close()
        return _Worker(process, parent)

    def _launch(self, running: _Running) -> None:
        phase = running.phases[running.index]
        result_path, log_path = self._paths(running)
        result_path.unlink(missing_ok=True)
        # Each phase sees what the one before it returned (e.g. the artifact's file name).
        spec = {**phase.spec, "previous": running.results[-1]} if running.results else phase.spec
        request = (phase.name, spec, str(result_path), str(log_path), self.memory_limit_mb)
        on_gpu = spec.get("target", {}).get("device", "cpu") != "cpu"
        chosen = self._spawn() if on_gpu else self._take_spare()
        try:
            chosen.conn.send(request)
        except (OSError, EOFError):  # the spare died while it waited
            self._discard(chosen)
            chosen = self._spawn() if on_gpu else self._fork()
            chosen.conn.send(request)
        running.worker = chosen
        self._watch_worker(chosen)
        if on_gpu or self._spare is not None:
            return
        try:
            self._spare = self._fork()  # the next phase's process, forked while this one runs
        except OSError as exc:  # the phase above runs regardless; the next one forks then
            log.warning("could not fork a spare worker: %s", exc)

    def _take_spare(self) -> _Worker:
        spare, self._spare = self._spare, None
        return spare if spare is not None else self._fork()

    def _watch_worker(self, chosen: _Worker) -> None:
        if self.on_exit is not None:
            chosen.watcher = threading.Thread(target=self._watch, args=(chosen,), daemon=True)
            chosen.watcher.start()

    def _watch(self, chosen: _Worker) -> None:
        try:
            multiprocessing.connection.wait([chosen.conn, chosen.process.sentinel])
        except OSError:
            pass  # the connection was closed under us: the job has been dealt with
        self.on_exit()

    @property
    def next_deadline(self) -> float | None:
        return min((r.deadline for r in self._running.values()), default=None)

    def poll(self) -> list[Outcome]:
        """Advance every running job; return the jobs that have ended."""
        self._reap_exiting()
        done = []
        for job_id, running in list(self._running.items()):
            outcome = self._advance(running)
            if outcome is not None:
                del self._running[job_id]
                done.append(outcome)
        return done

    def _advance(self, running: _Running) -> Outcome | None:
        chosen = running.worker
        finished = chosen.conn.poll() or not chosen.process.is_alive()
        if not finished:
            if self.clock() < running.deadline:
                return None
            self._discard(chosen)
            reason = f"timed out after {self.timeout_seconds:g} s in {running.phases[running.index].name}"
            return Outcome(running.job_id, "failed", running.results, reason)
        result_path, log_path = self._paths(running)
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError):
            chosen.process.join(5)
            chosen.close()
            code = chosen.process.exitcode
            how = f"killed by signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
            reason = f"worker process died in {running.phases[running.index].name} ({how}){_last_words(log_path)}"
            return Outcome(running.job_id, "failed", running.results, reason)
        chosen.close()
        self._exiting.append((chosen.process, self.clock()))
        running.results.append(result)
        status = result.get("status")
        if status in PHASE_ENDS_JOB:
            return Outcome(running.job_id, status, running.results, result.get("reason"))
        running.index += 1
        if running.index == len(running.phases):
            return Outcome(running.job_id, status, running.results)
        self._launch(running)
        return None

    def _reap_exiting(self) -> None:
        still = []
        for process, since in self._exiting:
            if not process.is_alive():
                process.join()
            elif self.clock() - since > EXIT_GRACE_SECONDS:
                self._kill(process)
            else:
                still.append((process, since))
        self._exiting = still

    def _discard(self, chosen: _Worker) -> None:
        self._kill(chosen.process)
        chosen.close()

    @staticmethod
    def _kill(process) -> None:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.join(5)

    def progress(self, job_id: int) -> dict | None:
        """What the job's worker last reported doing (``pipeline/progress.py``), or None."""
        running = self._running.get(job_id)
        return None if running is None else progress.read(running.work_dir)

    def cancel(self, job_id: int) -> None:
        """Kill the job's worker and forget the job (it was cancelled)."""
        running = self._running.pop(job_id, None)
        if running is not None and running.worker is not None:
            self._discard(running.worker)

    def kill_all(self) -> None:
        """Kill every process this executor started, at once."""
        for running in list(self._running.values()):
            if running.worker is not None and running.worker.process.is_alive():
                self._kill(running.worker.process)
        if self._spare is not None and self._spare.process.is_alive():
            self._kill(self._spare.process)
        for process, _ in self._exiting:
            if process.is_alive():
                self._kill(process)

    def stop(self, timeout: float) -> list[int]:
        """Give running phases ``timeout`` seconds to end, then kill them.

        :returns: the ids of jobs that did not finish (their leases go back to pending).
        """
        deadline = time.monotonic() + timeout
        for running in self._running.values():
            running.worker.process.join(max(0.0, deadline - time.monotonic()))
        unfinished = list(self._running)
        for running in self._running.values():
            self._discard(running.worker)
        self._running.clear()
        if self._spare is not None:
            self._discard(self._spare)
            self._spare = None
        for process, _ in self._exiting:
            process.join(2)
            if process.is_alive():
                self._kill(process)
        self._exiting.clear()
        atexit.unregister(self.kill_all)
        return unfinished
