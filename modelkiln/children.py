"""Hygiene for the processes modelkiln starts: workers and the ranks of sharded variants."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent dies: a worker must not
    outlive the daemon that leased its job and go on writing behind a restarted one,
    nor a rank the worker that started it."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def leave_signals_to_parent() -> None:
    """Ctrl-C and a SIGTERM sent to the whole process group or cgroup (systemd's default
    KillMode) are for the daemon: it lets running jobs finish for its stop timeout, then
    kills them itself and hands them back to pending. A child dying on the same signal
    would turn a clean stop into failed jobs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def thread_lock_for_progress_bars() -> None:
    """tqdm (the progress bars of transformers and huggingface_hub) makes a
    multiprocessing lock on its first bar: a named POSIX semaphore that the process
    unlinks when it exits normally. A worker ends with ``os._exit`` and never does, so
    each job loading a Hugging Face model left one in /dev/shm, held by the resource
    tracker until the daemon exited (one per job, for as long as the daemon ran). A
    worker is one process: a thread lock serves tqdm as well."""
    import threading

    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())
