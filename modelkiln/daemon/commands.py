"""What an operator did from the command line, acted on by the daemon's loop.

`kiln cancel`, `kiln promote`, `kiln rollback` and `kiln pin` only write the catalogue;
the daemon that runs the work finds their records every couple of seconds and acts:

- a running job that was cancelled is stopped, its scratch and staging folders go, and
  its checkpoint moves on without it (also for one cancelled just as it ended);
- a promotion made by hand has the link here brought in line, the plugins told (webhook)
  and a remote registry synced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pluggy import PluginManager

from ..plugins.manager import notify
from ..store import queries, views
from ..store.db import Store
from .logs import about
from .promoter import Promoter

log = logging.getLogger(__name__)


@dataclass
class Commands:
    store: Store
    promoter: Promoter
    manager: PluginManager
    # drop_cancelled(session, job): ends a running job that was cancelled (jobs.Jobs)
    drop_cancelled: Callable
    # tells a remote registry of a promotion soon
    sync_soon: Callable[[], None]
    # promotions up to this id were announced by whoever made them
    seen_promotion: int = 0

    def act(self, executor) -> None:
        """Stop the running jobs an operator cancelled, announce the promotions they made."""
        with self.store.session() as session:
            for job_id in queries.cancelled_among(session, executor.running_jobs):
                executor.cancel(job_id)
                self.drop_cancelled(session, queries.job(session, job_id))
            for promotion in queries.promotions_after(session, self.seen_promotion):
                self.seen_promotion = promotion.id
                if not promotion.decision_key.startswith("manual:"):
                    continue  # the policy's, announced by the daemon that decided it
                log.info("promoted %s on %s on an operator's command: %s (%s)", promotion.model, promotion.target,
                         views.variant_label(promotion.variant), promotion.reason,
                         extra=about(promotion.model, None, promotion.target))
                current = queries.current_promotion(session, promotion.model, promotion.target)
                if current is not None and current.id == promotion.id:
                    self.promoter.publish(promotion)
                notify(self.manager, "kiln_variant_promoted", promotion=self.promoter.describe(promotion))
                self.sync_soon()
