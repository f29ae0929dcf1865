"""Shared setup for the benches: the default config's policy on N threads, and a table printer."""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch


def setup(threads: int = 2, sets: list[str] = ()):
    from selfplay.config import load_config
    from selfplay.policy import Policy
    from selfplay.reporting import quiet_libraries

    quiet_libraries()

    torch.set_num_threads(threads)
    cfg = load_config(None, [f"model.threads={threads}", *sets])
    return cfg, Policy(cfg)


def args(extra=None):
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="config override, e.g. model.device=cuda")
    if extra:
        extra(p)
    return p.parse_args()


def best_of(fn, repeats: int):
    """Minimum wall time over repeats (after one warm-up), and the last result."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(title: str, head: list[str], rows: list[list]) -> None:
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(n) for h, n in zip(head, w)))
    print("  ".join("-" * n for n in w))
    for r in rows:
        print("  ".join(str(x).ljust(n) for x, n in zip(r, w)))
    sys.stdout.flush()
