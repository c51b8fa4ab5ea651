"""The directory registry: checkpoints are folders ``<root>/<model>/<version>/``.

Nothing here decides *when* a version is complete; it only observes folders cheaply
(names, sizes, modification times) so the ingest step can tell a new or changed
version from one it has already taken, and make a content-addressed snapshot.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from ..plugins import hookimpl
from ..plugins.api import Candidate, RegistryKind

# Model and version names become folder names under artifacts/ and promoted/:
# nothing that could climb out of a root or confuse a shell.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def valid_name(name: str) -> bool:
    return bool(NAME_PATTERN.match(name)) and ".." not in name


@dataclass(frozen=True)
class Observation:
    """A cheap look at a version folder."""

    files: tuple[str, ...]
    size_bytes: int
    newest_mtime: float
    fingerprint: str
    # Symlinks that point outside the version folder (never followed).
    escaping_links: tuple[str, ...]


def observe(path: Path) -> Observation:
    entries = []
    escaping = []
    newest = path.stat().st_mtime
    total = 0
    root = path.resolve()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        dirnames.sort()
        newest = max(newest, os.stat(dirpath).st_mtime)
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, path)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                target = Path(full).resolve()
                if not str(target).startswith(str(root) + os.sep):
                    escaping.append(rel)
                    continue
                st = os.stat(full)
            if not stat.S_ISREG(st.st_mode):
                continue
            newest = max(newest, st.st_mtime)
            total += st.st_size
            entries.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(entries + escaping).encode()).hexdigest()
    files = tuple(e.split("\0", 1)[0] for e in entries)
    return Observation(files, total, newest, digest, tuple(escaping))


def content_hash(path: Path, files: tuple[str, ...]) -> str:
    """SHA-256 over relative names and contents: the checkpoint's identity."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0")
        with open(path / rel, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def copy_files(source: Path, files: tuple[str, ...], destination: Path) -> None:
    """Copy the observed files (links resolved inside the folder) into ``destination``."""
    for rel in files:
        dst = destination / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, dst)


class DirectoryRegistry(RegistryKind):
    """Version folders written into the watched folder by people or tools."""

    kind = "directory"
    # File-system events under ``path`` are worth watching: checkpoints are written there.
    watches = True

    def __init__(self, config):
        self.path = config.registry_path

    def scan(self) -> list[Candidate]:
        """Every well-named version folder; hidden and staging folders are skipped."""
        found = []
        if not self.path.is_dir():
            return found
        for model_dir in sorted(self.path.iterdir()):
            if not self._is_own_dir(model_dir):
                continue
            for version_dir in sorted(model_dir.iterdir()):
                if self._is_own_dir(version_dir):
                    found.append(self._candidate(model_dir.name, version_dir.name, version_dir))
        return found

    def _candidate(self, model: str, version: str, path: Path) -> Candidate:
        return Candidate(model, version, path)

    def _is_own_dir(self, path: Path) -> bool:
        # A symlinked model or version folder could point anywhere: never followed.
        return valid_name(path.name) and path.is_dir() and not path.is_symlink()

    def locate(self, path: str | os.PathLike) -> list[Candidate]:
        """The version folder(s) an event path belongs to: a path inside a version, a
        version folder, or a whole model folder moved in."""
        try:
            rel = Path(os.path.abspath(path)).relative_to(self.path)
        except ValueError:
            return []
        parts = rel.parts
        if not parts or not valid_name(parts[0]):
            return []
        model_dir = self.path / parts[0]
        if len(parts) == 1:
            if not self._is_own_dir(model_dir):
                return []
            return [
                Candidate(parts[0], v.name, v) for v in sorted(model_dir.iterdir()) if self._is_own_dir(v)
            ]
        if not valid_name(parts[1]):
            return []
        return [Candidate(parts[0], parts[1], model_dir / parts[1])]


@hookimpl
def kiln_registry_kinds():
    return {"directory": DirectoryRegistry}
