"""Run inside a mount namespace whose artifacts folder is a small tmpfs (see
test_reliability): promote version 1, fill the filesystem to a few MB, process version 2,
and print what the catalogue and the disk look like as JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from helpers import optimize_once

from modelkiln.config import load_config
from modelkiln.store import queries

# Room for the new snapshot (about 1.4 MiB) and the reference outputs, not for a variant.
LEFT_FREE = int(1.6 * 2**20)


def main(config_path: str, v1: str, v2: str) -> None:
    config = load_config(config_path)
    artifacts = config.artifacts_path
    first = optimize_once(config, Path(v1), "digits", "1")
    link = config.promoted_path / "digits" / "cpu"
    before = str(link.resolve())
    stat = os.statvfs(artifacts)
    filler = artifacts / "filler"
    with open(filler, "wb") as fh:  # written, not sparse: tmpfs counts the pages
        remaining = stat.f_bavail * stat.f_frsize - LEFT_FREE
        while remaining > 0:
            fh.write(b"\0" * min(remaining, 1 << 20))
            remaining -= 1 << 20
    second = optimize_once(config, Path(v2), "digits", "2")
    from modelkiln.store.db import open_store

    store = open_store(config)
    with store.session() as session:
        variants = [(v.checkpoint.version, v.runtime, v.recipe or "baseline", v.status, v.reason)
                    for v in queries.variants_of_model(session, "digits")]
        promotions = [(p.checkpoint_id, p.target) for p in queries.promotion_history(session, "digits")]
    store.dispose()
    print(json.dumps({
        "first": first.status, "second": second.status, "second_reason": second.reason,
        "link_before": before, "link_after": str(link.resolve()),
        "link_complete": (link.resolve() / "variant.json").is_file(),
        "variants": variants, "promotions": promotions,
        "staging_left": [str(p) for p in artifacts.rglob(".tmp-*")],
        "work_left": sorted(str(p.relative_to(artifacts)) for p in (artifacts / ".work").rglob("*") if p.is_file()),
        "incoming_left": [str(p) for p in (artifacts / ".incoming").glob("*")] if (artifacts / ".incoming").is_dir() else [],
    }))


if __name__ == "__main__":
    main(*sys.argv[1:])
