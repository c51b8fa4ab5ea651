"""What a phase costs the host: its process's peak resident memory and the most bytes it
had newly written under the artifacts root at once.

Each phase runs in a process of its own (``worker.py``), so the process's high-water
mark is the phase's. Disk is sampled: the folders the phase writes (the job's work
folder, the variant's staging folder) are walked every half second and once at the end,
counting each file once however many names it has, and not at all a file that was there
before the phase began or that was linked from content stored before (``targets.blobs``):
a variant whose shards another variant wrote already costs only its own files.
"""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

from ..targets import blobs

# How often the folders are walked: a 13.5 GB shard takes seconds to write.
SAMPLE_SECONDS = 0.5


def peak_host_bytes() -> int:
    """This process's peak resident memory. ``VmHWM`` where Linux has it: getrusage's
    figure can carry the peak of the process this one was exec'd from (a spawned GPU
    worker's parent is the daemon)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def allocated_files(roots: list[Path]) -> dict[tuple[int, int], int]:
    """(device, inode) -> bytes allocated, of every file under ``roots``."""
    found: dict[tuple[int, int], int] = {}
    stack = [str(root) for root in roots]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:  # not there (yet), or removed while walked
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    stat = entry.stat(follow_symlinks=False)
                    found[(stat.st_dev, stat.st_ino)] = stat.st_blocks * 512
            except OSError:
                continue
    return found


class DiskPeak:
    """The most bytes newly written under ``roots`` at any sample, from ``start()`` to
    ``stop()``; sampled on a thread when ``sample`` (a build writes gigabytes), else only
    at the end (a measurement writes little, and its timings must not share the GIL)."""

    def __init__(self, roots: list[Path], sample: bool = True):
        self.roots = roots
        self.sample = sample
        self.peak = 0
        self._before: set[tuple[int, int]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def new_bytes(self) -> int:
        skip = self._before | blobs.reused()
        return sum(size for key, size in allocated_files(self.roots).items() if key not in skip)

    def _take(self) -> None:
        self.peak = max(self.peak, self.new_bytes())

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._take()

    def start(self) -> DiskPeak:
        self._before = set(allocated_files(self.roots))
        if self.sample:
            self._thread = threading.Thread(target=self._run, name="kiln-disk-peak", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._take()
        return self.peak
