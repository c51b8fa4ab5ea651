"""The full SIGKILL campaign: fifty seeded runs of tests/chaos.py, a table of the outcomes.

Each run: 3 checkpoints dropped into a served daemon with two targets, 3 SIGKILLs at
seeded moments in the first 8 s (each followed by a restart), then the daemon finishes;
a reader thread checks every promoted link all along, and the catalogue is checked at
the end (see tests/chaos.py). Usage: python bench/bench_sigkill.py [RUNS] [FIRST_SEED]

``--postgres``: the catalogue on a throwaway PostgreSQL server on loopback
(tests/postgres.py), a fresh database per run; ``--daemons 2``: two daemons on the one
catalogue and folder, as two hosts would, each kill striking one of them at random.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))
from chaos import run_campaign
from common import print_table


def main():
    args = sys.argv[1:]
    daemons = 1
    if "--daemons" in args:
        at = args.index("--daemons")
        daemons = int(args[at + 1])
        del args[at:at + 2]
    server = None
    if "--postgres" in args:
        import postgres

        args.remove("--postgres")
        server = postgres.Server(postgres.binaries())
    runs = int(args[0]) if args else 50
    first = int(args[1]) if len(args) > 1 else 1
    rows, failed, started = [], 0, time.time()
    for seed in range(first, first + runs):
        url = server.new_database() if server else None
        with tempfile.TemporaryDirectory(prefix="kiln-sigkill-") as tmp:
            result = run_campaign(Path(tmp), seed, store_url=url, daemons=daemons)
        failed += bool(result["problems"])
        rows.append([seed, " ".join(f"{t:.1f}" for t in result["kills_at_s"]), f"{result['seconds']:.0f}",
                     result["reader_looks"], "ok" if not result["problems"] else "; ".join(result["problems"])[:120]])
        print(f"seed {seed}: {rows[-1][-1]}", flush=True)
    if server:
        server.stop()
    where = f"{'PostgreSQL' if server else 'SQLite'}, {daemons} daemon(s)"
    print_table(f"SIGKILL campaign ({where}): {runs} runs, {failed} with problems, {time.time() - started:.0f} s", rows,
                ["seed", "kills at (s)", "run s", "reader looks", "outcome"])


if __name__ == "__main__":
    main()
