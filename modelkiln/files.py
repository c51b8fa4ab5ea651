"""Files that other processes read while modelkiln writes them: written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path


def write_whole(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a hidden temporary beside ``path``, flush it to disk, then rename
    it into place: a reader (or a daemon after a crash) sees the old file or the new one,
    never a part."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
