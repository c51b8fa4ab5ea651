"""Keeping a remote registry and the catalogue in step (registry kinds with ``poll``).

Runs on the scheduler's thread, every ``poll_seconds`` and at once after a promotion:
new versions are downloaded into the registry's cache and the service loop is told to
rescan; then every current promotion of a checkpoint from that registry is published
back to it. Downloads can take minutes, which is why this is not the loop's work; the
database is only read here, so every write still happens on the loop's thread.
"""

from __future__ import annotations

import logging
import queue

from ..store import queries, views
from .logs import about

log = logging.getLogger(__name__)


class RegistrySync:
    def __init__(self, registry, store, inbox: queue.Queue, describe):
        self.registry = registry
        self.store = store
        self.inbox = inbox
        self.describe = describe  # Promoter.describe: a promotion as `kiln promoted --json` prints it
        # Why the last poll failed (None: it succeeded, or none ran yet): /healthz says so.
        self.problem: str | None = None

    def __call__(self) -> None:
        try:
            if self.registry.poll():
                self.inbox.put(("rescan", None))
            self.problem = None
        except Exception as exc:
            self.problem = f"polling failed: {exc}"[:300]
            log.warning("%s registry: polling failed (%s); trying again at the next poll", self.registry.kind, exc)
        for promotion, variants in self.current_promotions():
            try:
                self.registry.publish(promotion, variants)
            except Exception as exc:
                log.warning("%s registry: cannot publish the promotion of %s version %s on %s yet (%s); "
                            "trying again at the next poll", self.registry.kind, promotion["model"],
                            promotion["version"], promotion["target"], exc,
                            extra=about(promotion["model"], promotion["version"], promotion["target"]))

    def current_promotions(self) -> list[tuple[dict, list[dict]]]:
        out = []
        with self.store.session() as session:
            for promotion in queries.current_promotions(session):
                checkpoint = promotion.variant.checkpoint
                if checkpoint.registry_kind != self.registry.kind:
                    continue
                variants = [views.variant_dict(v) for v in queries.variants_of(session, checkpoint.id, promotion.target)]
                out.append((self.describe(promotion), variants))
        return out
