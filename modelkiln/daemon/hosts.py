"""Hosts sharing a catalogue, and recovery of what a stopped daemon left.

Several daemons may run on one catalogue (PostgreSQL), each with its own config file and
so its own target table; each says at its start and at every rescan that it is still
here, with that table. A daemon that starts also finds what its predecessor on this
machine left half-done.

    check_config(...)    the config against the installed plugins, before anything starts
    available_targets()  the configured targets whose hardware this host has
    join()               refuse a shared target defined otherwise by a live host, then say
                         this host is here
    recover(session)     jobs a dead daemon of this machine left running back to pending;
                         then as at a rescan
    rescan(session)      still here; variants planned for what this host's config asks and
                         nobody planned; pending jobs it no longer asks for cancelled (at
                         the start); ready checkpoints whose jobs all ended settled
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from datetime import timedelta

from ..config import TargetConfig
from ..errors import ConfigError
from ..plugins.recipes import parse_recipe
from ..store import queries, units, views
from ..store.models import Job
from ..targets.devices import target_unavailable_reason
from .logs import about, about_job
from .planner import Planner

log = logging.getLogger(__name__)

# A host that has not said it runs on the catalogue for this long (or three rescans) is
# gone: its target table no longer binds the others.
HOST_SEEN_SECONDS = 600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_config(config, plugins) -> None:
    """The config against the installed plugins: a registry kind, runtimes and devices
    they serve, recipes of steps they provide. Raises ConfigError naming the key."""
    file = config.source
    kinds = plugins.registry_kinds
    if config.registry.kind not in kinds:
        raise ConfigError(f"{file}: registry.kind {config.registry.kind!r} is not installed "
                          f"(installed: {', '.join(sorted(kinds))})")
    for name, target in config.targets.items():
        for runtime in target.runtimes:
            if runtime not in plugins.runtimes:
                raise ConfigError(f"{file}: targets.{name}.runtimes names {runtime!r}, which no "
                                  f"plugin provides (installed: {', '.join(sorted(plugins.runtimes))})")
        served = {r: plugins.runtimes[r].devices for r in target.runtimes}
        if not any(target.device.split(":", 1)[0] in devices for devices in served.values()):
            raise ConfigError(f"{file}: targets.{name}.device {target.device!r} is served by none of its runtimes ("
                              + "; ".join(f"{r}: {', '.join(d)}" for r, d in served.items()) + ")")
        for text in target.recipes:
            parse_recipe(text, plugins.steps, f"{file}: targets.{name}.recipes")


class Hosts:
    def __init__(self, config, store, plugins, planner: Planner, settle):
        """:param settle: ``settle(session, checkpoint)`` decides the promotions of a ready
            checkpoint whose jobs ended and closes it (the daemon's step after each job)."""
        self.config = config
        self.store = store
        self.plugins = plugins
        self.planner = planner
        self.settle = settle

    def available_targets(self) -> list[str]:
        available = []
        for name, target in self.config.targets.items():
            reason = target_unavailable_reason(target, self.plugins.runtimes)
            if reason:
                log.warning("target %s is unavailable on this host (%s); its jobs wait for a host "
                            "that has it", name, reason)
            else:
                available.append(name)
        return available

    def _target_table(self) -> dict:
        return {name: dataclasses.asdict(target) for name, target in sorted(self.config.targets.items())}

    @property
    def key(self) -> str:
        """This daemon's name in the catalogue's ``hosts``: the machine and its config file
        (two daemons of one machine with different configs are two hosts to each other)."""
        return f"{socket.gethostname()}:{self.config.source or 'no config file'}"

    def join(self) -> None:
        """Refuse a target defined otherwise by another host running on this catalogue
        (seen within HOST_SEEN_SECONDS): its variants would be measured two ways and each
        host would cancel the other's recipes. Then record this host's table."""
        mine = self._target_table()
        host = self.key
        with self.store.session() as session:
            since = units.database_now(session) - timedelta(seconds=max(HOST_SEEN_SECONDS,
                                                                        3 * self.config.registry.rescan_seconds))
            # A key one host's version does not know yet counts as its default there.
            defaults = dataclasses.asdict(TargetConfig())
            for peer in queries.hosts_seen_since(session, since):
                if peer.name == host:
                    continue
                for name, ours in mine.items():
                    theirs = peer.targets.get(name)
                    if theirs is None:
                        continue
                    here, there = {**defaults, **ours}, {**defaults, **theirs}
                    if there == here:
                        continue
                    differs = "; ".join(f"{key} = {here.get(key)!r} here, {there.get(key)!r} there"
                                        for key in sorted(set(here) | set(there)) if here.get(key) != there.get(key))
                    raise ConfigError(
                        f"{self.config.source}: targets.{name} is defined otherwise by host {peer.name} (machine:"
                        f"config), which runs on this catalogue ({differs}). Hosts sharing a catalogue must define a shared "
                        "target alike: make the two definitions equal, or give this one another name.")
            units.record_host(session, host, mine)

    def recover(self, session) -> None:
        """Jobs a dead daemon of this machine left running go back to pending now, not
        after their lease runs out; recipes removed from the config since lose their
        pending jobs; then as at every rescan."""
        machine = socket.gethostname()
        dead = [
            owner for owner in queries.running_owners(session)
            if owner and owner.rsplit(":", 1)[0] == machine
            and (int(owner.rsplit(":", 1)[1]) == os.getpid() or not _pid_alive(int(owner.rsplit(":", 1)[1])))
        ]
        if dead:
            n = units.requeue_owned(session, dead, self.config.workers.max_attempts,
                                    "the daemon running it stopped")
            log.info("returned %d job(s) of a stopped daemon to pending", n)
        self._plan_missing(session)
        for checkpoint in queries.checkpoints_with_status(session, "ready"):  # recipes removed since
            self._cancel_unwanted(session, queries.pending_variant_jobs(session, checkpoint.id))
        self._settle_all(session)

    def rescan(self, session) -> None:
        units.record_host(session, self.key, self._target_table())  # still here
        self._plan_missing(session)
        self._settle_all(session)

    def _plan_missing(self, session) -> int:
        """Variant jobs for what this host's config asks of checkpoints already inspected
        and not planned yet: recipes or targets added to this config since, or checkpoints
        another host inspected for its own targets (hosts sharing a catalogue may run
        different target tables). A done checkpoint given jobs is ready again, so its
        promotions are decided as they end. One query for the whole catalogue, on start
        and at every rescan; returns how many variants were added."""
        wanted = self.planner.wanted()
        targets = sorted({target for target, _, _ in wanted})
        added = 0
        for checkpoint_id, planned in queries.planned_by_checkpoint(session, ("ready", "done"), targets).items():
            if not wanted - planned:
                continue
            checkpoint = queries.checkpoint(session, checkpoint_id)
            missing = self.planner.plan(session, checkpoint, only_missing=True, planned=planned)
            count = units.add_variants(session, checkpoint.id, missing)
            if count:
                units.reopen(session, checkpoint)
                added += count
                log.info("%s/%s: %d variant(s) planned for %s, added to this host's config or not planned by the "
                         "host that inspected it", checkpoint.model, checkpoint.version, count,
                         ", ".join(sorted({p.target for p in missing})),
                         extra=about(checkpoint.model, checkpoint.version))
        return added

    def _cancel_unwanted(self, session, jobs: list[Job]) -> int:
        """Cancel the pending variant jobs whose recipe or runtime this host's config no
        longer asks for; returns how many."""
        cancelled = 0
        for job in jobs:
            reason = self.planner.unwanted_reason(queries.variant_of(session, job))
            if reason is not None:
                units.cancel_jobs(session, [job], f"cancelled: {reason}")
                log.info("job %d cancelled: %s %s", job.id, views.variant_label(queries.variant_of(session, job)), reason,
                         extra=about_job(session, job))
                cancelled += 1
        return cancelled

    def _settle_all(self, session) -> None:
        """Decide and close the ready checkpoints whose jobs ended without this daemon
        seeing them end (cancelled from the command line, ended under a killed daemon)."""
        for checkpoint in queries.checkpoints_with_status(session, "ready"):
            self.settle(session, checkpoint)
