"""The verifier: the only ground truth of the project.

`verify(answer, numbers, target)` accepts a step list (`25+3=28,28-7=21`) or a plain expression
(`(25+3)-7`). Exact rational arithmetic (ints, and `fractions.Fraction` once a division leaves a
remainder); the expression is read by an operator-precedence parser of exactly this grammar, never
evaluated as code:

    expr := term (('+' | '-') term)*      term := atom (('*' | '/') atom)*
    atom := integer | '(' expr ')'        (spaces between tokens; no unary signs; no leading zeros)

Precedence of reasons: not in the grammar, or nested deeper than MAX_DEPTH → unparseable; a literal
above MAX_ABS → bad_numbers; division by zero or an intermediate above MAX_ABS → bad_arithmetic
(the first one met, left to right). Length, nesting depth and magnitude are bounded, so any string
returns a `Verdict` quickly and nothing raises. Step lists are integer-only
by design (a step's stated result is an integer literal); fractional intermediates need the
expression format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

MAX_ANSWER_CHARS = 400  # longer answers are unparseable: bounds parse time for any input
MAX_DEPTH = 32  # expression nesting bound (ast recursion stays far from Python's limit)
MAX_ABS = 10**12  # bound on |numerator| and denominator of every intermediate value
REASONS = ("solved", "wrong_value", "bad_numbers", "bad_arithmetic", "unparseable")


@dataclass(slots=True)  # (not frozen: a frozen dataclass's __init__ cost as much as parsing an answer)
class Verdict:
    solved: bool
    reason: str  # one of REASONS
    value: int | Fraction | None = None  # the answer's exact value when it could be computed (int when whole)
    detail: str = ""

    @property
    def well_formed(self) -> bool:
        """Parsed and arithmetically valid (the student's format credit is based on this)."""
        return self.reason in ("solved", "wrong_value")


_STEP = re.compile(r"^(\d{1,7})([+\-*/])(\d{1,7})=(\d{1,13})$")
_EXPR_CHARS = re.compile(r"^[0-9+\-*/() ]+$")


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


def _exact(op: str, a: int | Fraction, b: int | Fraction) -> int | Fraction | None:
    """`apply_op` that keeps whole values as ints (5x cheaper than Fractions) until a division
    leaves a remainder; exact either way."""
    if op == "/" and type(a) is int and type(b) is int:
        if b == 0:
            return None
        q, r = divmod(a, b)
        return q if r == 0 else Fraction(a, b)
    return apply_op(op, a, b)


class _Bad(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail


_TOKENS = re.compile(r"\d+|\S")


_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _parse(s: str):
    """(value, leaves, height, errors) of an expression of the grammar above; raises _Bad
    (unparseable) for anything else. Operator precedence parsing (shunting-yard): one pass over
    the tokens with a stack of operands and one of pending operators; an operator is applied when
    the next one binds no tighter, which is the post-order of the expression's tree, so the value
    is computed operands left to right. After the first arithmetic error, or a literal above
    MAX_ABS, the value is None and `errors` says why. (One loop, not recursive descent: the
    verifier runs on every sample, and Python calls were most of its cost.)"""
    vals: list = []  # operand values (None after an error) ...
    heights: list[int] = []  # ... and the heights of their trees
    ops: list[str] = []  # pending operators and open parentheses
    leaves: list[int] = []
    error: list[_Bad] = []  # in evaluation order

    def apply() -> None:
        op, b, a = ops.pop(), vals.pop(), vals.pop()
        hb, ha = heights.pop(), heights.pop()
        heights.append((ha if ha > hb else hb) + 1)
        v = None
        if a is not None and b is not None:
            v = _exact(op, a, b)
            if v is None:
                error.append(_Bad("bad_arithmetic", "division by zero"))
            elif _too_big(v):
                error.append(_Bad("bad_arithmetic", "intermediate value out of bounds"))
                v = None
        vals.append(v)

    operand = True  # an operand (a number or "(") comes next
    for t in _TOKENS.findall(s):
        if operand:
            if t == "(":
                ops.append(t)
                continue
            if not t.isdigit() or (t[0] == "0" and t.strip("0")):
                raise _Bad("unparseable", f"{t!r} where a number belongs")  # (01 is no Python literal either)
            x = int(t)
            leaves.append(x)
            if x > MAX_ABS:
                error.append(_Bad("bad_numbers", "number not in the task"))
            vals.append(None if error else x)
            heights.append(0)
            operand = False
        elif t in _PREC:
            p = _PREC[t]
            while ops and ops[-1] != "(" and _PREC[ops[-1]] >= p:  # left-associative
                apply()
            ops.append(t)
            operand = True
        elif t == ")":
            while ops and ops[-1] != "(":
                apply()
            if not ops:
                raise _Bad("unparseable", "unexpected ')'")
            ops.pop()
        else:
            raise _Bad("unparseable", f"unexpected {t!r}")
    if operand:
        raise _Bad("unparseable", "expression ends early")
    while ops:
        if ops[-1] == "(":
            raise _Bad("unparseable", "unbalanced parentheses")
        apply()
    return vals[0], leaves, heights[0], error


def _verify_expr(s: str, numbers: list[int], target: int) -> Verdict:
    if not _EXPR_CHARS.match(s) or s.count("(") > MAX_DEPTH:
        return Verdict(False, "unparseable", detail="only digits, + - * / ( ) allowed, bounded nesting")
    try:
        value, leaves, height, error = _parse(s)
    except _Bad as e:
        return Verdict(False, e.reason, detail=e.detail)
    if height > MAX_DEPTH:
        return Verdict(False, "unparseable", detail="nested too deeply")
    bad = [e for e in error if e.reason == "bad_numbers"] or error
    if bad:
        return Verdict(False, bad[0].reason, detail=bad[0].detail)
    if sorted(leaves) != sorted(numbers):
        return Verdict(False, "bad_numbers", value, "numbers differ from the task's")
    return _finish(value, True, target)
