"""Weight files stored once across the variants of an artifacts root.

Variants of one checkpoint often hold the same weights byte for byte: a bf16
checkpoint's baseline, its ``quantize.bf16`` and that recipe compiled are three copies
of the same shards, 13.5 GB each for a 7B model. So a file whose content is already in
the blob store (``artifacts/.blobs/<sha256>``, the daemon's ``Layout.blobs``) becomes a
hard link to it instead of a second copy, and a file written anew is linked into the
store for the next variant.

The decision comes before anything is written: the key is a hash of what the file will
hold (tensor names, dtypes, shapes and raw bytes, read in memory where they are), so the
disk never holds a duplicate, not even for a moment. The store keeps no count of its own: a blob's
link count is how many variants use it, and the daemon removes one whose only link left
is the store's (``Layout.drop_unused_blobs``). Blobs are never written in place: every
variant that links one would change with it.

Where a hard link is impossible (the store on another filesystem, one without links)
the file is written as a copy, and the log says so once per process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# Files linked from content another variant stored, as (st_dev, st_ino): what this
# process did not write, for the job's new-bytes figure (pipeline/footprint.py).
_reused: set[tuple[int, int]] = set()
_warned = False
# Errors that say this filesystem (or pair of them) takes no hard link here.
_NO_LINKS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}


def tensors_key(tensors: dict, metadata: dict | None = None, kind: str = "safetensors") -> str:
    """The sha256 key of a safetensors file's content before it is written: of its
    tensors' names, dtypes and shapes (by name, as safetensors orders them itself), the
    file's metadata, and each tensor's own sha256 over its raw bytes. The tensors are
    hashed on a few threads at once (hashlib lets go of the GIL): a 7B model's 13.5 GB
    takes seconds, not tens of them. Tensors must be on the CPU and contiguous."""
    names = sorted(tensors)
    header = {"kind": kind, "metadata": metadata or {},
              "tensors": [[name, str(tensors[name].dtype), list(tensors[name].shape)] for name in names]}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    workers = min(HASH_THREADS, os.cpu_count() or 1, len(names))
    digests = None
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="kiln-hash") as pool:
                digests = list(pool.map(lambda name: _tensor_digest(tensors[name]), names))
        except RuntimeError:  # no thread to be had (a worker's address-space limit): one at a time
            digests = None
    for part in digests if digests is not None else (_tensor_digest(tensors[name]) for name in names):
        digest.update(part)
    return digest.hexdigest()


# Threads that hash one file's tensors at once.
HASH_THREADS = 8


def _tensor_digest(tensor) -> bytes:
    import torch

    digest = hashlib.sha256()
    if tensor.numel():
        # The bytes as they are, without a copy.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.digest()


def place(store: Path | None, key: str, destination: Path, write: Callable[[Path], None]) -> bool:
    """Make ``destination`` hold the content named ``key``: a hard link to the store's
    blob where it has one, else ``write(destination)`` and a link to it added to the
    store. Returns whether the content was there already (nothing written).

    A blob removed under us (its last variant went) makes the link fail, and the file is
    written; a blob added under us by another job keeps ours a copy: neither loses data."""
    if store is None:
        write(destination)
        return False
    blob = store / key
    try:
        stat = blob.stat()
    except FileNotFoundError:
        stat = None
    if stat is not None:
        # Known as reused before the link exists, so that no sample of the job's disk use
        # counts it as written.
        inode = (stat.st_dev, stat.st_ino)
        _reused.add(inode)
        try:
            os.link(blob, destination)
            return True
        except FileNotFoundError:  # removed since: its last variant went
            _reused.discard(inode)
        except OSError as exc:
            _reused.discard(inode)
            if exc.errno not in _NO_LINKS:
                raise
            _cannot_link(store, destination, exc)
            write(destination)
            return False
    write(destination)
    try:
        store.mkdir(parents=True, exist_ok=True)
        os.link(destination, blob)
    except FileExistsError:
        # Another job stored the same content while this one wrote it: keep one copy.
        _swap_for_link(blob, destination)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        _cannot_link(store, destination, exc)
    return False


def _swap_for_link(blob: Path, destination: Path) -> None:
    spare = destination.with_name(f".{destination.name}.link")
    try:
        os.link(blob, spare)
        os.replace(spare, destination)
    except OSError:  # the blob went meanwhile, or no link here: ours stays a copy
        spare.unlink(missing_ok=True)


def _cannot_link(store: Path, destination: Path, exc: OSError) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("cannot hard-link %s to the blob store %s (%s): variants' identical weight files are "
                    "written as copies; keep the artifacts root on one filesystem that takes hard links to "
                    "store them once", destination, store, exc.strerror or exc)


def reused() -> set[tuple[int, int]]:
    """The (device, inode) of every file this process linked from content stored before."""
    return set(_reused)
