"""Exhaustive Countdown solver: certifies tutor-made tasks as solvable, counts solutions (a
difficulty feature) and gives reference solutions: its own (`solve`), or the flat solution nearest
to a student's failed attempt (`nearest_solution`, for hints built on what the student wrote).

Search splits the multiset into two parts and combines the values reachable from each (memoised
on the sorted sub-multiset). Counts expression trees up to commutativity of + and *; fine up to 6
numbers. Floats search, `verify` certifies: a float near-miss is never reported as a solution.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from itertools import permutations, product

import numpy as np

from selfplay.domains.countdown.verifier import MAX_ABS, apply_op, verify


def _key(v: float) -> float:
    return round(v, 6)


def _splits(nums: tuple[int, ...]):
    """The distinct unordered splits (left, right) of the sorted multiset `nums` into two non-empty
    parts (the last element always goes right; duplicate numbers would give a split twice)."""
    n, seen = len(nums), set()
    for mask in range(1, 2 ** (n - 1)):
        split = (tuple(nums[i] for i in range(n) if mask >> i & 1), tuple(nums[i] for i in range(n) if not mask >> i & 1))
        if split not in seen:
            seen.add(split)
            yield split


@lru_cache(maxsize=100_000)
def _counts(nums: tuple[int, ...]) -> dict[float, int]:
    """Values reachable using every number of the sorted multiset `nums` once -> number of trees.

    Float search (exact answers are confirmed with `verify`); splits are unordered, so + and * are
    counted once per pair of subtrees and - and / once per order.
    """
    if len(nums) == 1:
        return {float(nums[0]): 1}
    out: dict[float, int] = {}
    for left, right in _splits(nums):
        rl = _counts(right)
        for a, ca in _counts(left).items():
            for b, cb in rl.items():
                c = ca * cb
                vals = [a + b, a * b, a - b, b - a]
                if b:
                    vals.append(a / b)
                if a:
                    vals.append(b / a)
                for v in vals:
                    if abs(v) <= MAX_ABS:
                        k = _key(v)
                        out[k] = out.get(k, 0) + c
    return out


def _find(pool: list, target: float, integer: bool):
    """Depth-first search with early exit; pool items are (value, expression tree).

    `integer=True` only keeps non-negative integer intermediates (solutions the step format can write).
    """
    if len(pool) == 1:
        return pool[0][1] if abs(pool[0][0] - target) < 1e-6 else None
    for i in range(len(pool)):
        for j in range(i + 1, len(pool)):
            (a, ea), (b, eb) = pool[i], pool[j]
            rest = pool[:i] + pool[i + 1:j] + pool[j + 1:]
            cands = [(a + b, ("+", ea, eb)), (a * b, ("*", ea, eb)), (a - b, ("-", ea, eb)),
                     (b - a, ("-", eb, ea))]
            if b:
                cands.append((a / b, ("/", ea, eb)))
            if a:
                cands.append((b / a, ("/", eb, ea)))
            for v, e in cands:
                if integer and (v < 0 or v != int(v)):
                    continue
                hit = _find(rest + [(v, e)], target, integer)
                if hit is not None:
                    return hit
    return None


def to_expr(e, parent: str = "", right: bool = False) -> str:
    """An expression tree as text with only the parentheses precedence needs: `25-7+3`, `25-(7-3)`."""
    if isinstance(e, int):
        return str(e)
    op, a, b = e
    text = f"{to_expr(a, op)}{op}{to_expr(b, op, True)}"
    tight = {"+": 1, "-": 1, "*": 2, "/": 2}
    needs = parent and (tight[op] < tight[parent] or (right and tight[op] == tight[parent] and parent in "-/"))
    return f"({text})" if needs else text


def flat_expr(numbers: list[int], target: int) -> str | None:
    """A flat `+`/`-` solution, added numbers first (`25+3-7`), or None: the simplest form of a
    solution, which is what the environment shows when one exists."""
    k = len(numbers)
    for m in range(1, 2 ** k):
        plus = [n for i, n in enumerate(numbers) if m >> i & 1]
        minus = [n for i, n in enumerate(numbers) if not m >> i & 1]
        if sum(plus) - sum(minus) == target:
            return "+".join(map(str, plus)) + "".join(f"-{n}" for n in minus)
    return None


def to_steps(e) -> str | None:
    """Render an expression tree as the integer step format, or None if an intermediate is fractional."""
    steps: list[str] = []

    def go(x) -> Fraction:
        if isinstance(x, int):
            return Fraction(x)
        op, a, b = x
        va, vb = go(a), go(b)
        v = apply_op(op, va, vb)
        if v.denominator != 1 or v < 0 or va.denominator != 1 or vb.denominator != 1:
            raise ValueError
        steps.append(f"{va}{op}{vb}={v}")
        return v

    try:
        go(e)
    except ValueError:
        return None
    return ",".join(steps)


@dataclass(frozen=True)
class Solution:
    count: int  # expression trees reaching the target (up to commutativity); -1 if not counted
    expr: str | None  # one solution as an expression
    steps: str | None  # the same in step format when all intermediates are non-negative integers


def solve(numbers: list[int], target: int, count: bool = True) -> Solution:
    """Exhaustively solve a task (each number used exactly once); `count=False` skips counting."""
    pool = [(float(n), n) for n in numbers]
    tree = _find(pool, float(target), True) or _find(pool, float(target), False)
    if tree is None:
        return Solution(0, None, None)
    expr = flat_expr(numbers, target) or to_expr(tree)
    if not verify(expr, numbers, target).solved:  # a float near-miss: certify exactly or not at all
        return Solution(0, None, None)
    n = _counts(tuple(sorted(numbers))).get(_key(float(target)), 1) if count else -1
    return Solution(n, expr, to_steps(tree))


_TOKEN = re.compile(r"\d+|\S")


def _flat_value(ns: tuple[int, ...], ops: tuple[str, ...]) -> float | None:
    """The value of the flat expression n0 op0 n1 op1 ... with standard precedence, as a float (the
    winner is certified by `verify`); None on a division by zero."""
    total, sign, term = 0.0, 1, float(ns[0])
    for o, n in zip(ops, ns[1:]):
        if o == "*":
            term *= n
        elif o == "/":
            if n == 0:
                return None
            term /= n
        else:
            total, sign, term = total + sign * term, 1 if o == "+" else -1, float(n)
    return total + sign * term


def flat_solutions(numbers: list[int], target: int) -> list[list[str]]:
    """Every solution without parentheses, as token lists (`["3", "+", "25", "-", "7"]`): each
    distinct order of the numbers, each operator between (4 numbers: 1,536 candidates, ~1 ms)."""
    out = []
    for order in sorted(set(permutations(numbers))):
        for ops in product("+-*/", repeat=len(order) - 1):
            v = _flat_value(order, ops)
            if v is not None and abs(v - target) < 1e-6:
                toks = [str(order[0])]
                for o, n in zip(ops, order[1:]):
                    toks += [o, str(n)]
                out.append(toks)
    return out


def nearest_solution(numbers: list[int], target: int, attempts: list[str]) -> tuple[str, int] | None:
    """The verified solution that shares the longest prefix (in tokens: numbers and characters)
    with one of the failed `attempts`, and that attempt's index; None when no flat solution starts
    with the first number of any attempt. The minimal correction of what the student wrote: a hint
    built on it forces mostly the student's own tokens, so its hinted attempts continue from
    states the student reaches by itself (a canonical solution's prefix is one it rarely visits).
    Only flat solutions are candidates (the tiny prior writes flat expressions 75% of the time)."""
    best, k_best = None, 0
    sols = flat_solutions(numbers, target)
    for i, a in enumerate(attempts):
        toks = _TOKEN.findall(a or "")
        for sol in sols:
            k = 0
            for x, y in zip(toks, sol):
                if x != y:
                    break
                k += 1
            if k > k_best:
                best, k_best = ("".join(sol), i), k
    if best is None or not verify(best[0], numbers, target).solved:  # floats search, the verifier certifies
        return None
    return best


def reachable_values(nums: tuple[int, ...]) -> dict[float, int]:
    """Values (rounded floats) reachable from the sorted multiset `nums`, each number once -> tree count."""
    return _counts(nums)


@lru_cache(maxsize=100_000)
def _value_array(nums: tuple[int, ...]) -> np.ndarray:
    return np.fromiter(_counts(nums), dtype=np.float64)


def reachable_integers(numbers: list[int], lo: int, hi: int) -> list[int]:
    """Sorted integers in [lo, hi] that the numbers reach, each used once: the same set as the
    integer keys of `reachable_values` (tested), without rounding and counting every value of the
    top level in Python (1.5 -> 0.6 ms for 3-4 numbers; the task generator calls it per fresh task).
    The sub-multisets' value sets come from the memoised search; only the last combination runs as
    float64 array ops, whose + - * / round as Python's floats do, and a value counts as the integer
    t when round(v, 6) == t, i.e. |v - t| <= 5e-7. numpy, not torch: on arrays of a few thousand
    values torch's per-op cost doubled the time (0.87 vs 0.46 ms a task, first sight of its numbers)."""
    nums = tuple(sorted(numbers))
    with np.errstate(divide="ignore", invalid="ignore"):  # x / 0 = inf or nan: dropped below
        if len(nums) == 1:
            v = _value_array(nums)
        else:
            parts = []
            for left, right in _splits(nums):
                a, b = _value_array(left)[:, None], _value_array(right)[None, :]
                parts += [a + b, a * b, a - b, b - a, a / b, b / a]
            v = np.concatenate([p.ravel() for p in parts])
        r = np.round(v)
        ok = (np.abs(v - r) <= 5e-7) & (r >= lo) & (r <= hi) & (np.abs(v) <= MAX_ABS)
    return np.unique(r[ok]).astype(np.int64).tolist()


def flat_solvable(numbers: list[int], target: int) -> bool:
    """Solved by a flat `+`/`-` expression (some numbers added, the rest subtracted): the shortcut
    a non-aiming prior stumbles on. `eval` reports the solve rate on tasks without it."""
    return flat_expr(numbers, target) is not None


def solvable(numbers: list[int], target: int) -> bool:
    """Certified solvability. The memoised reachable-value set rules most unsolvable tasks out
    3-4x faster than an exhaustive depth-first search; a hit is confirmed exactly by `solve`."""
    if _key(float(target)) not in _counts(tuple(sorted(numbers))):
        return False
    return solve(numbers, target, count=False).expr is not None


