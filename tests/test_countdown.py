import json
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfplay.domains.countdown import (Difficulty, MUTATIONS, Task, generate_tasks, mutate, parse_task, read_tasks,
                                        solvable, solve, verify, write_tasks)

N, T = [25, 3, 7], 21


@pytest.mark.parametrize("answer,reason", [
    ("25+3=28,28-7=21", "solved"),
    ("25-7=18, 18+3=21", "solved"),
    ("(25+3)-7", "solved"),
    ("25 - 7 + 3", "solved"),
    ("25+3=28,28+7=35", "wrong_value"),       # valid arithmetic, 35 != 21
    ("(25-3)*7", "wrong_value"),              # 154
    ("25+3=28", "bad_numbers"),               # 7 unused
    ("25+3=28,28-3=25,25-7=18", "bad_numbers"),  # 3 used twice
    ("(25+3)-8", "bad_numbers"),              # 8 is not a task number
    ("25+3-7+7", "bad_numbers"),              # 7 twice
    ("25+3=27,27-7=20", "bad_arithmetic"),    # 25+3 is 28
    ("25/0=0", "bad_arithmetic"),
    ("", "unparseable"),
    ("hello", "unparseable"),
    ("25+3=28,,oops", "unparseable"),
    ("-25+3+7", "unparseable"),               # unary minus is not in the whitelist
])
def test_verdict_reasons(answer, reason):
    assert verify(answer, N, T).reason == reason


def test_exact_rational_arithmetic():
    # 8 / 3 * 3 = 8 exactly (floats would give 7.999...); (1 + 1/3) * 3 = 4
    assert verify("8/3*3", [8, 3, 3], 8).solved
    assert verify("(1+1/3)*3", [1, 1, 3, 3], 4).solved
    assert verify("7/2", [7, 2], 3).reason == "wrong_value"  # 3.5 is not 3
    assert verify("1/(3-3)", [1, 3, 3], 1).reason == "bad_arithmetic"


@pytest.mark.parametrize("evil", [
    "__import__('os').system('echo pwned')", "2**99999", "9999999999*9999999999*9999999999*9999999999",
    "(" * 5000 + "1" + ")" * 5000, "((((((((((((((((((((((((((((((((((((1))))))))))))))))))))))))))))))))))",
    "١+٢", "1/0", "1.5*2", "-1", "--1", "1e5", "0x10", "lambda: 1", "[1]*9", "1 if 1 else 2", "x" * 100000,
    "25+3=28" * 1000, "25\x00+3", "99999999999999999999=1",
])
def test_adversarial_strings_are_rejected(evil):
    v = verify(evil, [1, 2, 3], 6)
    assert not v.solved and v.reason in ("unparseable", "bad_numbers", "bad_arithmetic", "wrong_value")


@settings(max_examples=400, deadline=200)
@given(st.lists(st.sampled_from(list("0123456789+-*/()=, ") + ["**", "١", ".", "25", "-"]), max_size=40).map("".join),
       st.lists(st.integers(1, 30), min_size=1, max_size=5), st.integers(-50, 200))
def test_random_strings_never_raise_and_solved_means_correct(s, nums, target):
    v = verify(s, nums, target)
    assert v.reason in ("solved", "wrong_value", "bad_numbers", "bad_arithmetic", "unparseable")
    if v.solved:  # independently re-check: an expression must use exactly the numbers and equal the target
        if "=" not in s:
            import ast
            leaves = sorted(n.value for n in ast.walk(ast.parse(s.strip(), mode="eval")) if isinstance(n, ast.Constant))
            assert leaves == sorted(nums)
        assert v.value == Fraction(target)


def _reference_verdict(s: str, nums: list[int], target: int) -> tuple[str, Fraction | None]:
    """The expression verdict by Python's own parser: the grammar (BinOp of + - * / over int
    literals, tree height <= 32) first, then literals <= 10**12, then exact arithmetic, post-order."""
    import ast
    import warnings

    ops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "1(2)" parses as a call, with a SyntaxWarning
            tree = ast.parse(s.strip(), mode="eval").body
    except SyntaxError:
        return "unparseable", None

    def height(n):
        if isinstance(n, ast.Constant) and type(n.value) is int:
            return 0
        if isinstance(n, ast.BinOp) and type(n.op) in ops:
            return 1 + max(height(n.left), height(n.right))
        return 10**9  # not in the grammar

    if height(tree) > 32:
        return "unparseable", None
    leaves = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    if max(leaves) > 10**12:
        return "bad_numbers", None

    def ev(n):
        if isinstance(n, ast.Constant):
            return Fraction(n.value)
        a, b = ev(n.left), ev(n.right)
        op = ops[type(n.op)]
        if op == "/" and b == 0:
            raise ZeroDivisionError
        v = {"+": a + b, "-": a - b, "*": a * b}[op] if op != "/" else a / b
        if abs(v.numerator) > 10**12 or v.denominator > 10**12:
            raise ZeroDivisionError
        return v

    try:
        v = ev(tree)
    except ZeroDivisionError:
        return "bad_arithmetic", None
    if sorted(leaves) != sorted(nums):
        return "bad_numbers", v
    return ("solved" if v == target else "wrong_value"), v


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(["1", "2", "3", "6", "0", "00", "07", "25", "9999999999999", "1000000",
                                 "(", ")", "+", "-", "*", "/", " ", "**", "//"]), max_size=24).map("".join))
def test_expression_parser_agrees_with_pythons_parser(s):
    # The verifier's hand parser (5x faster than ast.parse + a walk, on the graph's hot path) gives
    # the reason and value that Python's own parser and exact arithmetic give, for any such string.
    if not s.strip() or "=" in s:
        return
    v = verify(s, [1, 2, 3], 6)
    reason, value = _reference_verdict(s, [1, 2, 3], 6)
    assert (v.reason, v.value if reason in ("solved", "wrong_value", "bad_numbers") else None) == (reason, value), s


def test_expression_parser_agrees_on_well_formed_expressions():
    # Random expression trees over the task's numbers (and 0, for division by zero), printed with
    # random brackets and spaces: solved, wrong_value, bad_numbers and bad_arithmetic all occur.
    rng = random.Random(0)

    def tree(depth):
        if depth == 0 or rng.random() < 0.3:
            return rng.choice(["1", "2", "3", "3", "0", "6"])
        text = f"{tree(depth - 1)}{rng.choice(['', ' '])}{rng.choice('+-*/')}{rng.choice(['', ' '])}{tree(depth - 1)}"
        return f"({text})" if rng.random() < 0.5 else text

    seen = set()
    for _ in range(3000):
        s = tree(rng.randrange(1, 5))
        if rng.random() < 0.1:  # outside the grammar: a sign, an open bracket, a call, a leading zero
            s = rng.choice(["-", "(", "2(", "07+"]) + s
        reason, value = _reference_verdict(s, [1, 2, 3], 6)
        v = verify(s, [1, 2, 3], 6)
        seen.add(reason)
        assert (v.reason, v.value if reason in ("solved", "wrong_value", "bad_numbers") else None) == (reason, value), s
    assert {"solved", "wrong_value", "bad_numbers", "bad_arithmetic", "unparseable"} <= seen


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 25), min_size=2, max_size=4), st.integers(1, 100))
def test_solver_solutions_verify(nums, target):
    s = solve(nums, target)
    if s.expr is not None:
        assert s.count >= 1
        assert verify(s.expr, nums, target).solved
        if s.steps:
            assert verify(s.steps, nums, target).solved


def test_solver_counts_by_hand():
    # {1, 2} -> 3: only 1+2 (commutative, counted once); 2 - 1 = 1: one tree; 2*1 = 2 and 2/1 = 2: two trees
    assert solve([1, 2], 3).count == 1
    assert solve([1, 2], 1).count == 1
    assert solve([1, 2], 2).count == 2
    assert solve([2, 3], 7).count == 0 and not solvable([2, 3], 7)


def test_reachable_integers_equal_the_memoised_search():
    # the generator's fast path (the last combination as float64 tensor ops) against the definition:
    # the integer keys of the rounded reachable values, on 2-5 numbers and the hard split's range;
    # by hand, {2, 3} reach 1 (3-2), 5, 6 and nothing else in 1..10 (2/3, 3/2 are not integers)
    from selfplay.domains.countdown.solver import reachable_integers, reachable_values

    assert reachable_integers([3, 2], 1, 10) == [1, 5, 6]
    rng = random.Random(3)
    for _ in range(300):
        nums = [rng.randint(1, 25) for _ in range(rng.randint(2, 5))]
        lo, hi = rng.choice([(1, 100), (1, 300), (-50, 50)])
        slow = sorted(int(v) for v in reachable_values(tuple(sorted(nums))) if v == int(v) and lo <= v <= hi)
        assert reachable_integers(nums, lo, hi) == slow, nums


def test_generated_tasks_are_solvable_and_deterministic():
    a, b = generate_tasks(300, 1), generate_tasks(300, 1)
    assert [t.to_json() for t in a] == [t.to_json() for t in b]
    assert all(solvable(t.numbers, t.target) for t in a)
    d = Difficulty(min_count=5, max_count=5, max_value=50, max_target=500, cap=1000)
    hard = generate_tasks(20, 2, d)
    assert all(len(t.numbers) == 5 and 1 <= t.target <= 500 for t in hard)


def test_mutations_are_certified():
    rng = random.Random(0)
    kids = 0
    for t in generate_tasks(100, 3):
        for op in MUTATIONS:
            c = op(t, rng)
            if c is not None:
                kids += 1
                assert solvable(c.numbers, c.target) and c.parent == t.id and c.source.startswith("mutate:")
        c = mutate(t, rng)
        assert c is None or (c.key != t.key and solvable(c.numbers, c.target))
    assert kids > 100  # most operators usually find a certified child


def test_jsonl_round_trip_keeps_unknown_keys(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"numbers": [1, 2, 3], "target": 6, "difficulty": "easy"}\n\n{"numbers": [4, 5], "target": 9}\n')
    ts = read_tasks(p)
    assert ts[0].extra == {"difficulty": "easy"} and ts[1].numbers == [4, 5]
    write_tasks(tmp_path / "u.jsonl", ts)
    assert json.loads((tmp_path / "u.jsonl").read_text().splitlines()[0]) == {"numbers": [1, 2, 3], "target": 6, "difficulty": "easy"}


def test_bad_task_file_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"numbers": [1, 2], "target": 3}\n{"numbers": "x", "target": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_tasks(p)


def test_parse_task_tiny_format():
    assert parse_task("3 7 25>21").numbers == [3, 7, 25]
    assert parse_task("3 7 25>21").target == 21
    for bad in ("3 7 25", ">21", "3 7 25>-1", "0 7>7", "3  7>1", "a b>c", ""):
        assert parse_task(bad) is None
    assert Task([3, 7, 25], 21).key == Task([25, 7, 3], 21).key


def test_solution_text_has_only_needed_parentheses_and_prefers_flat():
    from selfplay.domains.countdown.solver import to_expr

    # by hand: a right operand of - or / keeps its parentheses; a tighter operand never needs them
    assert to_expr(("-", 25, ("-", 7, 3))) == "25-(7-3)" and to_expr(("+", ("-", 25, 7), 3)) == "25-7+3"
    assert to_expr(("*", ("+", 1, 2), 3)) == "(1+2)*3" and to_expr(("+", 24, ("/", 14, 7))) == "24+14/7"
    assert to_expr(("/", 8, ("*", 2, 2))) == "8/(2*2)" and to_expr(("/", ("/", 8, 2), 2)) == "8/2/2"
    assert solve([25, 3, 7], 21).expr == "25+3-7"  # a flat +/- solution exists: shown added-first


def test_generated_targets_are_not_dominated_by_sums():
    from selfplay.domains.countdown import flat_solvable

    tasks = generate_tasks(200, 10_007, Difficulty(3, 4, 1, 25, 1, 100))
    assert sum(sum(t.numbers) == t.target for t in tasks) == 0  # the plain sum is excluded by design
    assert sum(flat_solvable(t.numbers, t.target) for t in tasks) < 0.4 * 200  # the old generator: 70.5%
    assert len({t.target for t in tasks}) > 60
    assert all(solvable(t.numbers, t.target) for t in tasks)


def test_nearest_solution_continues_the_longest_prefix_of_a_failed_attempt():
    from selfplay.domains.countdown import nearest_solution
    from selfplay.domains.countdown.solver import flat_solutions

    # [3, 7, 25] -> 21 by hand: 3 and 25 added and 7 taken away, in every order that starts with a
    # number (no unary minus); nothing with * or / reaches 21 (25*3/7 = 75/7, 7*3 needs the 25 gone)
    assert sorted("".join(s) for s in flat_solutions([3, 7, 25], 21)) == ["25+3-7", "25-7+3", "3+25-7", "3-7+25"]
    # [2, 3, 4] -> 14: 3*4+2 in both orders of the product, 2+3*4 likewise
    assert sorted("".join(s) for s in flat_solutions([2, 3, 4], 14)) == ["2+3*4", "2+4*3", "3*4+2", "4*3+2"]
    assert flat_solutions([5, 5, 2], 20) == []  # only (5+5)*2: 5*5-2 = 23, 5*2+5 = 15, 5*5*2 = 50
    # "3+25+7" (35) shares "3 + 25" (3 tokens) with 3+25-7, more than with any other solution
    assert nearest_solution([3, 7, 25], 21, ["3+25+7"]) == ("3+25-7", 0)
    assert nearest_solution([2, 3, 4], 14, ["3*4-2"]) == ("3*4+2", 0)
    # "25*3-7" shares only "25": the first such solution in sorted order
    assert nearest_solution([3, 7, 25], 21, ["25*3-7"]) == ("25+3-7", 0)
    # attempt 0 shares nothing ("7" starts no solution), attempt 1 shares "3 +": attempt 1 is chosen
    assert nearest_solution([3, 7, 25], 21, ["7*3*25", "3+7+25"]) == ("3+25-7", 1)
    # a parenthesised attempt shares no token with a flat solution; no flat solution at all: None
    assert nearest_solution([3, 7, 25], 21, ["(25-7)*3"]) is None
    assert nearest_solution([5, 5, 2], 20, ["5+5*2"]) is None
    for t in generate_tasks(40, 3):  # whatever it returns is a solution by the verifier
        near = nearest_solution(t.numbers, t.target, [f"{t.numbers[0]}+{t.numbers[-1]}"])
        assert near is None or verify(near[0], t.numbers, t.target).solved
