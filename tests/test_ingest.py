"""Deciding when a version folder is complete, and what counts as new content."""

import os
import queue
import time
from dataclasses import replace

import pytest

from modelkiln.daemon.ingest import Ingestor
from modelkiln.daemon.layout import Layout
from modelkiln.daemon.watcher import Watcher
from modelkiln.registry.directory import DirectoryRegistry, valid_name
from modelkiln.registry.formats import kiln_checkpoint_formats
from modelkiln.store.db import open_store


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


@pytest.fixture
def ingestor(config):
    clock = Clock()
    return Ingestor(open_store(config), Layout(config.artifacts_path), kiln_checkpoint_formats(),
                    quiet_seconds=2.0, clock=clock), clock


def version_folder(config, model="tiny", version="1"):
    folder = config.registry_path / model / version
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    return folder


def candidates(config):
    return DirectoryRegistry(config).scan()


def test_a_folder_is_taken_only_after_the_quiet_period(config, ingestor):
    ingest, clock = ingestor
    version_folder(config)
    (candidate,) = candidates(config)
    result = ingest.ingest(candidate)
    assert result.outcome == "wait" and result.retry_at > clock.now
    clock.now = result.retry_at + 0.01
    assert ingest.ingest(candidate).outcome == "ingested"
    assert ingest.ingest(candidate).outcome == "unchanged"


def test_a_renamed_folder_is_taken_at_once(config, ingestor):
    ingest, _ = ingestor
    version_folder(config)
    (candidate,) = candidates(config)
    assert ingest.ingest(replace(candidate, complete=True)).outcome == "ingested"


def test_a_touched_but_unchanged_folder_is_not_new(config, ingestor):
    ingest, clock = ingestor
    folder = version_folder(config)
    (candidate,) = candidates(config)
    first = ingest.ingest(replace(candidate, complete=True))
    os.utime(folder / "model.safetensors", (clock.now + 5, clock.now + 5))
    clock.now += 10
    assert ingest.ingest(candidate).outcome == "unchanged"
    (folder / "model.safetensors").write_bytes(b"y" * 100)
    clock.now += 10
    second = ingest.ingest(candidate)
    assert second.outcome == "ingested" and second.checkpoint_id != first.checkpoint_id


def test_the_snapshot_is_what_was_hashed(config, ingestor):
    ingest, _ = ingestor
    folder = version_folder(config)
    (candidate,) = candidates(config)
    ingest.ingest(replace(candidate, complete=True))
    (folder / "model.safetensors").write_bytes(b"changed later")
    snapshots = list(config.artifacts_path.glob("tiny/*/checkpoint/model.safetensors"))
    assert [p.read_bytes() for p in snapshots] == [b"x" * 100]


@pytest.mark.parametrize("name", ["..", ".hidden", "a/b", "x" * 200, "bad\nname", "-flag", ""])
def test_unsafe_names_are_ignored(name):
    assert not valid_name(name)


def test_symlinked_model_folders_are_not_followed(config, tmp_path):
    outside = tmp_path / "outside" / "1"
    outside.mkdir(parents=True)
    (outside / "model.onnx").write_bytes(b"x")
    config.registry_path.mkdir(parents=True, exist_ok=True)
    (config.registry_path / "linked").symlink_to(outside.parent)
    assert candidates(config) == []


def test_a_symlink_out_of_the_checkpoint_is_rejected(config, ingestor, tmp_path):
    ingest, _ = ingestor
    folder = version_folder(config)
    (tmp_path / "secret").write_text("secret")
    (folder / "extra.bin").symlink_to(tmp_path / "secret")
    (candidate,) = candidates(config)
    result = ingest.ingest(replace(candidate, complete=True))
    from modelkiln.store.models import Checkpoint

    with ingest.store.session() as session:
        checkpoint = session.get(Checkpoint, result.checkpoint_id)
    assert checkpoint.status == "rejected" and "outside the checkpoint folder" in checkpoint.reason
    assert not list(config.artifacts_path.rglob("extra.bin"))


def test_the_watcher_reports_a_rename_as_complete(config):
    inbox = queue.Queue()
    registry = DirectoryRegistry(config)
    watcher = Watcher(registry, inbox)
    watcher.start()
    try:
        staged = config.registry_path / ".staging"
        staged.mkdir()
        (staged / "model.onnx").write_bytes(b"x")
        (config.registry_path / "m").mkdir()
        # watchdog adds a watch for a new folder when it sees it created; a rename into a
        # folder younger than that is seen as a plain change (taken after the quiet period).
        time.sleep(0.5)
        os.rename(staged, config.registry_path / "m" / "1")
        deadline = time.monotonic() + 5
        hints = []
        while time.monotonic() < deadline and not any(h.complete for h in hints):
            try:
                kind, hint = inbox.get(timeout=0.2)
                hints.append(hint)
            except queue.Empty:
                pass
        assert any(h.complete and (h.model, h.version) == ("m", "1") for h in hints)
    finally:
        watcher.stop()


def test_copying_and_hashing_run_off_the_service_loop(config, tiny_checkpoint):
    """A checkpoint of tens of GB takes minutes to copy and hash; the loop must go on
    reaping, leasing and renewing leases meanwhile (a stalled loop let its own running
    jobs' leases expire)."""
    import shutil

    from modelkiln.daemon.service import Daemon
    from modelkiln.store import queries

    daemon = Daemon(config, watch=False, schedule=False, preload=False)
    daemon.start()
    slow = daemon.ingestor.prepare

    def prepare(candidate):  # a big copy
        time.sleep(2.0)
        return slow(candidate)

    daemon.ingestor.prepare = prepare
    try:
        shutil.copytree(tiny_checkpoint, config.registry_path / "tiny" / "1")
        os.utime(config.registry_path / "tiny" / "1", (time.time() - 60, time.time() - 60))
        for path in (config.registry_path / "tiny" / "1").iterdir():
            os.utime(path, (time.time() - 60, time.time() - 60))
        daemon.inbox.put(("rescan", None))
        started = time.monotonic()
        daemon.run_once(0)
        daemon.run_once(0)
        assert time.monotonic() - started < 1.0  # the loop did not wait for the copy
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            daemon.run_once(0.1)
            with daemon.store.session() as session:
                if queries.checkpoints(session, "tiny"):
                    break
        with daemon.store.session() as session:
            assert [c.status for c in queries.checkpoints(session, "tiny")] == ["ingested"]
    finally:
        daemon.stop(0)


def test_a_copy_that_runs_out_of_disk_leaves_nothing_and_is_taken_once_space_returns(config, ingestor, monkeypatch):
    """ENOSPC in the middle of the snapshot copy (the disk filled by something else after
    the free-space check): the half-made copy goes, the error reaches the caller (the
    daemon logs it once), and the next look takes the folder whole."""
    import errno

    import modelkiln.daemon.ingest as ingest_module

    ingest, _ = ingestor
    version_folder(config)
    (candidate,) = candidates(config)
    real_copy = ingest_module.copy_files

    def copy_until_full(source, files, destination):
        destination.mkdir(parents=True)
        (destination / files[0]).write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ingest_module, "copy_files", copy_until_full)
    with pytest.raises(OSError, match="No space left on device"):
        ingest.ingest(replace(candidate, complete=True))
    incoming = config.artifacts_path / ".incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []
    monkeypatch.setattr(ingest_module, "copy_files", real_copy)  # space freed
    assert ingest.ingest(replace(candidate, complete=True)).outcome == "ingested"
