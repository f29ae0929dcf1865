"""Countdown: reach a target from given numbers with + - * /, each number used exactly once.

Pieces, each a plain function so tests and the curriculum can use them alone:

- `Task` and JSONL I/O (`{"numbers": [..], "target": N}` per line, unknown keys kept in `extra`).
- `generate_task`: seeded random tasks whose target is the value of a random expression over the
  numbers, so every generated task is reachable by construction.
- `verify(answer, numbers, target)`: the only ground truth of the project. Accepts a step list
  (`25+3=28,28-7=21`) or a plain expression (`(25+3)-7`). Exact rational arithmetic with
  `fractions.Fraction`; the expression is parsed with `ast` and walked over a whitelist, never
  evaluated as code. Length, nesting depth and magnitude are bounded, so any string returns a
  `Verdict` quickly and nothing raises.
  Step lists are integer-only by design (a step's stated result is an integer literal), which is
  the format the tiny model writes; fractional intermediates need the expression format.
- `solve`: exhaustive search by splitting the multiset into two parts and combining the values
  reachable from each (memoised on the sorted sub-multiset). Counts expression trees up to
  commutativity of + and *; fine up to 6 numbers.
- Mutation operators (add / remove / replace a number, re-target, widen the value range): the
  programmatic curriculum when the tutor's mutate turn is off. Each returns a task certified
  solvable by `solve`, or None.
"""

from __future__ import annotations

import ast
import json
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Iterable

MAX_ANSWER_CHARS = 400  # longer answers are unparseable: bounds parse time for any input
MAX_DEPTH = 32  # expression nesting bound (ast recursion stays far from Python's limit)
MAX_ABS = 10**12  # bound on |numerator| and denominator of every intermediate value
REASONS = ("solved", "wrong_value", "bad_numbers", "bad_arithmetic", "unparseable")


@dataclass
class Task:
    """A Countdown task. `id`/`parent`/`source` are curriculum metadata; `extra` keeps unknown JSONL keys."""

    numbers: list[int]
    target: int
    id: str | None = None
    parent: str | None = None
    source: str = "generated"
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Canonical identity of the puzzle (order of numbers does not matter)."""
        return " ".join(map(str, sorted(self.numbers))) + f">{self.target}"

    def to_json(self) -> dict:
        d = {"numbers": list(self.numbers), "target": self.target, **self.extra}
        for k in ("id", "parent"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.source != "generated":
            d["source"] = self.source
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Task":
        if not isinstance(d, dict):
            raise ValueError("a task line must be a JSON object")
        nums, target = d.get("numbers"), d.get("target")
        if not isinstance(nums, list) or not nums or not all(type(n) is int and n > 0 for n in nums):
            raise ValueError("'numbers' must be a non-empty list of positive integers")
        if type(target) is not int:
            raise ValueError("'target' must be an integer")
        known = {"numbers", "target", "id", "parent", "source"}
        return cls(list(nums), target, d.get("id"), d.get("parent"), d.get("source", "generated"),
                   {k: v for k, v in d.items() if k not in known})


def read_tasks(path: str | Path) -> list[Task]:
    """Read a JSONL task file; raises ValueError naming the file and line on bad input."""
    tasks = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            tasks.append(Task.from_json(json.loads(line)))
        except (ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}:{i}: {e}") from None
    if not tasks:
        raise ValueError(f"{path}: no tasks")
    return tasks


def write_tasks(path: str | Path, tasks: Iterable[Task]) -> None:
    Path(path).write_text("".join(json.dumps(t.to_json()) + "\n" for t in tasks))


# ---------------------------------------------------------------- verifier


@dataclass(frozen=True)
class Verdict:
    solved: bool
    reason: str  # one of REASONS
    value: Fraction | None = None  # the answer's value when it could be computed
    detail: str = ""

    @property
    def well_formed(self) -> bool:
        """Parsed and arithmetically valid (the student's format credit is based on this)."""
        return self.reason in ("solved", "wrong_value")


_STEP = re.compile(r"^(\d{1,7})([+\-*/])(\d{1,7})=(\d{1,13})$")
_EXPR_CHARS = re.compile(r"^[0-9+\-*/() ]+$")
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return None if b == 0 else a / b


def _too_big(x: Fraction) -> bool:
    return abs(x.numerator) > MAX_ABS or x.denominator > MAX_ABS


def verify(answer: str, numbers: list[int], target: int) -> Verdict:
    """Check an answer. Never raises, never executes the answer; bounded time for any string."""
    try:
        if not isinstance(answer, str):
            return Verdict(False, "unparseable", detail="not a string")
        s = answer.strip()
        if not s or len(s) > MAX_ANSWER_CHARS:
            return Verdict(False, "unparseable", detail="empty or too long")
        if "=" in s:
            return _verify_steps(s, numbers, target)
        return _verify_expr(s, numbers, target)
    except Exception as e:  # belt and braces: a verifier bug must not kill a run
        return Verdict(False, "unparseable", detail=f"internal: {type(e).__name__}")


def _finish(value: Fraction, used_all: bool, target: int) -> Verdict:
    if not used_all:
        return Verdict(False, "bad_numbers", value, "not every number used exactly once")
    if value != target:
        return Verdict(False, "wrong_value", value)
    return Verdict(True, "solved", value)


def _verify_steps(s: str, numbers: list[int], target: int) -> Verdict:
    pool = [Fraction(n) for n in numbers]
    steps = [p.replace(" ", "") for p in re.split(r"[,;\n]", s) if p.strip()]
    parsed = [_STEP.match(p) for p in steps]
    if not steps or not all(parsed):
        return Verdict(False, "unparseable", detail="not a step list a op b = c")
    value = None
    for m in parsed:
        a, op, b, c = Fraction(int(m[1])), m[2], Fraction(int(m[3])), Fraction(int(m[4]))
        got = _apply(op, a, b)
        if got is None or got != c:
            return Verdict(False, "bad_arithmetic", detail=f"{m[0]} is false")
        for x in (a, b):
            if x not in pool:
                return Verdict(False, "bad_numbers", detail=f"{x} is not available")
            pool.remove(x)
        pool.append(c)
        value = c
    return _finish(value, len(pool) == 1, target)


def _walk(node: ast.AST, leaves: list[int], depth: int) -> Fraction:
    if depth > MAX_DEPTH:
        raise _Bad("unparseable", "nested too deeply")
    if isinstance(node, ast.Constant) and type(node.value) is int:
        leaves.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        a = _walk(node.left, leaves, depth + 1)
        b = _walk(node.right, leaves, depth + 1)
        v = _apply(_OPS[type(node.op)], a, b)
        if v is None:
            raise _Bad("bad_arithmetic", "division by zero")
        if _too_big(v):
            raise _Bad("bad_arithmetic", "intermediate value out of bounds")
        return v
    raise _Bad("unparseable", f"{type(node).__name__} is not allowed")


class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail


def _verify_expr(s: str, numbers: list[int], target: int) -> Verdict:
    if not _EXPR_CHARS.match(s) or "**" in s or "//" in s:
        return Verdict(False, "unparseable", detail="only digits, + - * / ( ) allowed")
    if s.count("(") > MAX_DEPTH:
        return Verdict(False, "unparseable", detail="too many parentheses")
    try:
        tree = ast.parse(s, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return Verdict(False, "unparseable", detail="not an expression")
    leaves: list[int] = []
    # check the multiset of literals before arithmetic so huge literals cannot cost time
    try:
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and type(n.value) is int and n.value > MAX_ABS:
                return Verdict(False, "bad_numbers", detail="number not in the task")
        value = _walk(tree, leaves, 0)
    except _Bad as e:
        return Verdict(False, e.reason, detail=e.detail)
    if sorted(leaves) != sorted(numbers):
        return Verdict(False, "bad_numbers", value, "numbers differ from the task's")
    return _finish(value, True, target)


# ---------------------------------------------------------------- generator


@dataclass(frozen=True)
class Difficulty:
    """Knobs of the task generator."""

    min_count: int = 3
    max_count: int = 4
    min_value: int = 1
    max_value: int = 25
    min_target: int = 1
    max_target: int = 100
    ops: str = "+-*/"
    cap: int = 100  # largest intermediate value of the chain that defines the target


def random_chain(numbers: list[int], rng: random.Random, ops: str = "+-*/", cap: int = 10_000):
    """A random step list combining all numbers (integer, non-negative intermediates).

    Returns (steps, value) or None when no valid chain was drawn. Used both for task generation and
    for the bootstrap prior: "syntactically valid, semantically random".
    """
    pool = list(numbers)
    steps = []
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        a, b = pool[i], pool[j]
        choices = []
        for op in ops:
            if op == "+" and a + b <= cap:
                choices.append((op, a + b))
            elif op == "-" and a - b >= 0:
                choices.append((op, a - b))
            elif op == "*" and a * b <= cap:
                choices.append((op, a * b))
            elif op == "/" and b != 0 and a % b == 0:
                choices.append((op, a // b))
        if not choices:
            return None
        op, c = rng.choice(choices)
        steps.append(f"{a}{op}{b}={c}")
        pool = [x for k, x in enumerate(pool) if k not in (i, j)] + [c]
    return ",".join(steps), pool[0]


def random_expr(numbers: list, rng: random.Random, ops: str = "+-*/") -> tuple[str, Fraction]:
    """A random fully parenthesised expression using every item once: (text, exact value).

    Items are ints or already-built subexpressions `(text, value)` (a hint the expression must
    contain). Division by zero is avoided by re-drawing the operator.
    """
    nodes = [(str(n), Fraction(n), True) if isinstance(n, int) else (n[0], n[1], False) for n in numbers]
    while len(nodes) > 1:
        i, j = rng.sample(range(len(nodes)), 2)
        (ta, va, la), (tb, vb, lb) = nodes[i], nodes[j]
        op = rng.choice(ops)
        if op == "/" and vb == 0:
            op = rng.choice([o for o in ops if o != "/"] or ["+"])
        text = f"{ta if la else f'({ta})'}{op}{tb if lb else f'({tb})'}"
        nodes = [x for k, x in enumerate(nodes) if k not in (i, j)] + [(text, _apply(op, va, vb), False)]
    return nodes[0][0], nodes[0][1]


def generate_task(rng: random.Random, d: Difficulty = Difficulty()) -> Task:
    """A task whose target is the value of a random chain over its numbers (reachable by construction)."""
    while True:
        k = rng.randint(d.min_count, d.max_count)
        numbers = [rng.randint(d.min_value, d.max_value) for _ in range(k)]
        chain = random_chain(numbers, rng, d.ops, d.cap)
        if chain and d.min_target <= chain[1] <= d.max_target:
            return Task(numbers, chain[1])


def generate_tasks(n: int, seed: int, d: Difficulty = Difficulty(), prefix: str = "t") -> list[Task]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = generate_task(rng, d)
        t.id = f"{prefix}{seed}-{i}"
        out.append(t)
    return out


# ---------------------------------------------------------------- solver

def _key(v: float) -> float:
    return round(v, 6)


@lru_cache(maxsize=100_000)
def _counts(nums: tuple[int, ...]) -> dict[float, int]:
    """Values reachable using every number of the sorted multiset `nums` once -> number of trees.

    Float search (exact answers are confirmed with `verify`); splits are unordered, so + and * are
    counted once per pair of subtrees and - and / once per order.
    """
    if len(nums) == 1:
        return {float(nums[0]): 1}
    out: dict[float, int] = {}
    n = len(nums)
    seen = set()
    for mask in range(1, 2 ** (n - 1)):  # the last element is always on the right: unordered splits
        left = tuple(nums[i] for i in range(n) if mask >> i & 1)
        right = tuple(nums[i] for i in range(n) if not mask >> i & 1)
        if (left, right) in seen:  # duplicate numbers give the same split twice
            continue
        seen.add((left, right))
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


def to_expr(e) -> str:
    if isinstance(e, int):
        return str(e)
    op, a, b = e
    return f"({to_expr(a)}{op}{to_expr(b)})"


def to_steps(e) -> str | None:
    """Render an expression tree as the integer step format, or None if an intermediate is fractional."""
    steps: list[str] = []

    def go(x) -> Fraction:
        if isinstance(x, int):
            return Fraction(x)
        op, a, b = x
        va, vb = go(a), go(b)
        v = _apply(op, va, vb)
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
    expr = to_expr(tree)
    expr = expr[1:-1] if expr.startswith("(") else expr
    if not verify(expr, numbers, target).solved:  # a float near-miss: certify exactly or not at all
        return Solution(0, None, None)
    n = _counts(tuple(sorted(numbers))).get(_key(float(target)), 1) if count else -1
    return Solution(n, expr, to_steps(tree))


def solvable(numbers: list[int], target: int) -> bool:
    return solve(numbers, target, count=False).expr is not None


# ---------------------------------------------------------------- mutation operators


def _certified(numbers: list[int], target: int, parent: Task, op: str) -> Task | None:
    if not numbers or not solvable(numbers, target):
        return None
    return Task(numbers, target, parent=parent.id, source=f"mutate:{op}")


def add_number(t: Task, rng: random.Random, d: Difficulty = Difficulty()) -> Task | None:
    if len(t.numbers) >= d.max_count:
        return None
    return _certified(t.numbers + [rng.randint(d.min_value, d.max_value)], t.target, t, "add")


def remove_number(t: Task, rng: random.Random, d: Difficulty = Difficulty()) -> Task | None:
    if len(t.numbers) <= max(2, d.min_count):
        return None
    nums = list(t.numbers)
    nums.pop(rng.randrange(len(nums)))
    return _certified(nums, t.target, t, "remove")


def replace_number(t: Task, rng: random.Random, d: Difficulty = Difficulty()) -> Task | None:
    nums = list(t.numbers)
    nums[rng.randrange(len(nums))] = rng.randint(d.min_value, d.max_value)
    return _certified(nums, t.target, t, "replace")


def retarget(t: Task, rng: random.Random, d: Difficulty = Difficulty()) -> Task | None:
    chain = random_chain(t.numbers, rng, d.ops, d.cap)
    if chain is None or not d.min_target <= chain[1] <= d.max_target or chain[1] == t.target:
        return None
    return _certified(list(t.numbers), chain[1], t, "retarget")


def widen_range(t: Task, rng: random.Random, d: Difficulty = Difficulty()) -> Task | None:
    """Replace a number by one from a range twice as wide (harder arithmetic)."""
    nums = list(t.numbers)
    nums[rng.randrange(len(nums))] = rng.randint(d.min_value, 2 * d.max_value)
    return _certified(nums, t.target, t, "widen")


MUTATIONS = (add_number, remove_number, replace_number, retarget, widen_range)


def mutate(t: Task, rng: random.Random, d: Difficulty = Difficulty(), tries: int = 20) -> Task | None:
    """Apply random operators until one yields a certified-solvable task different from the parent."""
    for _ in range(tries):
        child = rng.choice(MUTATIONS)(t, rng, d)
        if child is not None and child.key != t.key:
            return child
    return None


def parse_task(text: str, max_count: int = 6, max_value: int = 10_000) -> Task | None:
    """Parse the tiny format `3 7 25>21` (as written by the tutor's mutate turn); None if malformed."""
    m = re.fullmatch(r"\s*((?:\d{1,5} ){1,%d}\d{1,5})>(\d{1,6})\s*" % (max_count - 1), text or "")
    if not m:
        return None
    nums = [int(x) for x in m[1].split()]
    if not all(0 < x <= max_value for x in nums) or int(m[2]) <= 0:
        return None
    return Task(nums, int(m[2]))

