"""The verifier: the only ground truth of the project.

`verify(answer, numbers, target)` accepts a step list (`25+3=28,28-7=21`) or a plain expression
(`(25+3)-7`). Exact rational arithmetic with `fractions.Fraction`; the expression is parsed with
`ast` and walked over a whitelist, never evaluated as code. Length, nesting depth and magnitude are
bounded, so any string returns a `Verdict` quickly and nothing raises. Step lists are integer-only
by design (a step's stated result is an integer literal); fractional intermediates need the
expression format.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from fractions import Fraction

MAX_ANSWER_CHARS = 400  # longer answers are unparseable: bounds parse time for any input
MAX_DEPTH = 32  # expression nesting bound (ast recursion stays far from Python's limit)
MAX_ABS = 10**12  # bound on |numerator| and denominator of every intermediate value
REASONS = ("solved", "wrong_value", "bad_numbers", "bad_arithmetic", "unparseable")


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


def apply_op(op: str, a: Fraction, b: Fraction) -> Fraction | None:
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
        got = apply_op(op, a, b)
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
        v = apply_op(_OPS[type(node.op)], a, b)
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


