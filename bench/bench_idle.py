"""CPU used by an idle daemon (its own process plus the worker fork server).

Run: .venv/bin/python bench/bench_idle.py [--seconds 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import Serve, kiln_folder, print_table

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    total = 0.0
    pids = [pid] + [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == pid]
    for p in pids:
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
        except OSError:
            pass
    return total


def _parent(pid: int) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    folder = kiln_folder()
    serve = Serve(folder)
    try:
        serve.wait_started()
        time.sleep(5)  # let the fork server finish importing torch
        c0, t0 = cpu_seconds(serve.process.pid), time.time()
        time.sleep(args.seconds)
        c1, t1 = cpu_seconds(serve.process.pid), time.time()
        share = (c1 - c0) / (t1 - t0) * 100
        print_table("idle daemon CPU", [[f"{t1 - t0:.0f}", f"{c1 - c0:.3f}", f"{share:.2f}%"]],
                    ["seconds", "cpu seconds", "share of one core"])
    finally:
        serve.stop()


if __name__ == "__main__":
    main()
