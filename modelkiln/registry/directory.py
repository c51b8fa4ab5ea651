"""The directory registry: checkpoints are folders ``<root>/<model>/<version>/``.

Nothing here decides *when* a version is complete; it only observes folders cheaply
(names, sizes, modification times) so the ingest step can tell a new or changed
version from one it has already taken, and make a content-addressed snapshot.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from ..plugins import hookimpl
from ..plugins.api import FoundCheckpoint, RegistryKind, version_order
from ..sizes import printable

log = logging.getLogger(__name__)

# Model and version names become folder names under artifacts/ and promoted/:
# nothing that could climb out of a root or confuse a shell.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def valid_name(name: str) -> bool:
    return bool(NAME_PATTERN.match(name)) and ".." not in name


# Deeper than this is no model layout: a folder bomb, refused with the reason.
MAX_DEPTH = 32


@dataclass(frozen=True)
class Observation:
    """A cheap look at a version folder."""

    files: tuple[str, ...]
    size_bytes: int
    newest_mtime: float
    fingerprint: str
    # Why the folder cannot be taken as it is (links that leave it or lead nowhere, names
    # that are not UTF-8, nesting too deep), each naming the entries; empty when none.
    problems: tuple[str, ...] = ()


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{printable(n)}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def observe(path: Path) -> Observation:  # noqa: C901 - over the complexity bound, not yet split
    """Names, sizes and times of the files under ``path``, walked without recursion and
    without following any link out of it (a link to a file inside counts as that file; a
    link to a folder is not walked)."""
    entries, escaping, broken, unnamed, deep = [], [], [], [], []
    newest = path.stat().st_mtime
    total = 0
    root = path.resolve()
    stack = [(str(path), 0)]
    while stack:
        folder, depth = stack.pop()
        newest = max(newest, os.stat(folder).st_mtime)
        for name in sorted(os.listdir(folder), reverse=True):
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, path)
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:  # undecodable bytes, kept as surrogates by os.listdir
                unnamed.append(rel.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace"))
                continue
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                try:
                    target = Path(full).resolve(strict=True)
                except (OSError, RuntimeError):  # dangling, or a loop of links
                    broken.append(rel)
                    continue
                if not str(target).startswith(str(root) + os.sep):
                    escaping.append(rel)
                    continue
                st = os.stat(full)
                if stat.S_ISDIR(st.st_mode):
                    continue  # what it links to is walked where it is
            if stat.S_ISDIR(st.st_mode):
                if depth + 1 > MAX_DEPTH:
                    deep.append(rel)
                else:
                    stack.append((full, depth + 1))
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            newest = max(newest, st.st_mtime)
            total += st.st_size
            entries.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}")
    for found in (entries, escaping, broken, unnamed, deep):
        found.sort()
    problems = []
    if escaping:
        problems.append(f"symlink(s) {_listing(escaping)} point outside the checkpoint folder and are never "
                        "followed; copy the files in instead")
    if broken:
        problems.append(f"symlink(s) {_listing(broken)} lead nowhere (dangling, or a loop); remove them or copy "
                        "the files in")
    if unnamed:
        problems.append(f"file name(s) {_listing(unnamed)} are not UTF-8; rename them")
    if deep:
        problems.append(f"folders nested deeper than {MAX_DEPTH} levels ({_listing(deep, 1)}); no model needs "
                        "that")
    digest = hashlib.sha256("\n".join(entries + escaping + broken + unnamed + deep).encode()).hexdigest()
    files = tuple(e.split("\0", 1)[0] for e in entries)
    return Observation(files, total, newest, digest, tuple(problems))


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

    def __init__(self, config) -> None:
        self.path = config.registry_path
        self._skipped: set[tuple[str, str]] = set()

    def scan(self) -> list[FoundCheckpoint]:
        """Every well-named version folder, each model's in version order; hidden and
        staging folders are skipped, anything else that is skipped is logged once."""
        found: list[FoundCheckpoint] = []
        if not self.path.is_dir():
            return found
        for model_dir in sorted(self.path.iterdir()):
            if not self._is_own_dir(model_dir):
                continue
            try:
                versions = sorted(model_dir.iterdir(), key=lambda p: version_order(p.name))
            except OSError as exc:
                self._skip(model_dir, f"cannot be listed ({exc})")
                continue
            for version_dir in versions:
                if self._is_own_dir(version_dir):
                    found.append(self._candidate(model_dir.name, version_dir.name, version_dir))
        return found

    def _candidate(self, model: str, version: str, path: Path) -> FoundCheckpoint:
        return FoundCheckpoint(model, version, path)

    def _is_own_dir(self, path: Path) -> bool:
        """A well-named real folder. A symlinked model or version folder could point
        anywhere: never followed. What is skipped, other than hidden and staging names,
        is logged once."""
        name = path.name
        if name.startswith("."):
            return False
        if not valid_name(name):
            self._skip(path, "is not a valid name (letters, digits, '.', '_', '+', '-'; at most 128; no '..'); "
                             "rename it")
            return False
        if path.is_symlink():
            self._skip(path, "is a symlink, which is never followed; move or copy the folder in instead")
            return False
        if not path.is_dir():
            if path.parent != self.path:
                self._skip(path, "is a file where a version folder is expected; put the files in "
                                 f"{path.parent}/<version>/")
            return False
        return True

    def _skip(self, path: Path, why: str) -> None:
        key = (str(path), why)
        if key not in self._skipped:
            self._skipped.add(key)
            log.warning("%s %s: skipped", printable(str(path)), why)

    def locate(self, path: str | os.PathLike) -> list[FoundCheckpoint]:
        """The version folder(s) an event path belongs to: a path inside a version, a
        version folder, or a whole model folder moved in."""
        try:
            rel = Path(os.path.abspath(path)).relative_to(self.path)
        except ValueError:
            return []
        parts = rel.parts
        if not parts or parts[0].startswith("."):
            return []
        model_dir = self.path / parts[0]
        if not (model_dir.exists() or model_dir.is_symlink()) or not self._is_own_dir(model_dir):
            return []
        if len(parts) == 1:
            return [FoundCheckpoint(parts[0], v.name, v)
                    for v in sorted(model_dir.iterdir(), key=lambda p: version_order(p.name)) if self._is_own_dir(v)]
        version_dir = model_dir / parts[1]
        if parts[1].startswith(".") or not (version_dir.exists() or version_dir.is_symlink()):
            return []  # gone already, or a staging folder: its rename brings it
        if not self._is_own_dir(version_dir):
            return []
        return [FoundCheckpoint(parts[0], parts[1], version_dir)]


@hookimpl
def kiln_registry_kinds():
    return {"directory": DirectoryRegistry}
