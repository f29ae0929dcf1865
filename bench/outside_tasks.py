"""Task files from a generator that shares no code with selfplay (the check of the science issue:
held-out tasks the project's own generator did not make). Numbers uniform in 1..25, the target
uniform in 1..100 (1..300 for 5 numbers), kept when some expression over all the numbers (each
once, + - * /, exact rationals) reaches it; unlike selfplay's generator it neither draws the target
from the reachable values nor excludes the plain sum. Writes outside-34.jsonl (200 tasks of 3-4
numbers) and outside-5.jsonl (100 tasks of 5 numbers) into the given folder.

    python bench/outside_tasks.py /tmp/outside
    selfplay eval --run runs/default --tasks /tmp/outside/outside-34.jsonl --samples 8 --json
"""
import json
import random
import sys
from pathlib import Path
from fractions import Fraction
from functools import lru_cache


@lru_cache(maxsize=None)
def values(nums):
    if len(nums) == 1:
        return frozenset([Fraction(nums[0])])
    out = set()
    n = len(nums)
    for mask in range(1, 2 ** n - 1):
        a = tuple(sorted(nums[i] for i in range(n) if mask >> i & 1))
        b = tuple(sorted(nums[i] for i in range(n) if not mask >> i & 1))
        for x in values(a):
            for y in values(b):
                out.update((x + y, x - y, x * y))
                if y != 0:
                    out.add(x / y)
    return frozenset(out)


def make(n, counts, hi, seed):
    rng = random.Random(seed)
    tasks = []
    while len(tasks) < n:
        k = rng.choice(counts)
        nums = [rng.randint(1, 25) for _ in range(k)]
        t = rng.randint(1, hi)
        if Fraction(t) in values(tuple(sorted(nums))):
            tasks.append({"numbers": nums, "target": t})
    return tasks

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    for name, n, counts, hi in (("outside-34.jsonl", 200, (3, 4), 100), ("outside-5.jsonl", 100, (5,), 300)):
        with open(out / name, "w") as f:
            for t in make(n, counts, hi, 20261124):
                f.write(json.dumps(t) + "\n")
