import pytest

from roles import TURNS
from roles.student import attempt_reward, extract_answer
from roles.tutor import (child_is_valid, edit_size, hint_learnability, hint_reward, judge_reward, mutate_reward,
                         parse_child, parse_verdict)
from selfplay.domains.countdown import Difficulty, Task, verify

TASK = Task([25, 3, 7], 21, id="p")


def test_attempt_reward_by_hand():
    assert attempt_reward(verify("(25-7)+3", TASK.numbers, 21), 0.1) == 1.0
    assert attempt_reward(verify("(25+7)+3", TASK.numbers, 21), 0.1) == 0.1   # well formed, 35
    assert attempt_reward(verify("(25+7)+4", TASK.numbers, 21), 0.1) == 0.0   # wrong numbers
    assert attempt_reward(verify("((25", TASK.numbers, 21), 0.1) == 0.0


def test_hint_reward_by_hand():
    # r = s * (1 - c * f). "25+" reveals 2 of the 5 tokens of "25+3-7" (f = 0.4); 3 of 4
    # continuations solved (s = 0.75); c = 0.5: 0.75 * (1 - 0.2) = 0.6
    assert hint_reward("25+", TASK, 0.75, 0.4, 0.5) == pytest.approx(0.6)
    # the same success with less revealed pays more: f = 0.2 -> 0.75 * 0.9 = 0.675
    assert hint_reward("25", TASK, 0.75, 0.2, 0.5) == pytest.approx(0.675)
    # a failing hint pays 0 however short; a full solution scores as a failure (s = 0)
    assert hint_reward("25", TASK, 0.0, 0.2, 0.5) == 0.0
    assert hint_reward("25+3-7", TASK, 1.0, 1.0, 0.5) == 0.0


def test_hint_learnability_by_hand():
    # r = 1 - s for 0 < s < 1, else 0: 1 of 4 continuations solved -> 0.75, 3 of 4 -> 0.25
    assert hint_learnability("25", TASK, 0.25) == pytest.approx(0.75)
    assert hint_learnability("25+", TASK, 0.75) == pytest.approx(0.25)
    # a hint every attempt finishes (s = 1) or none does (s = 0) leaves a flat group: 0
    assert hint_learnability("25+3", TASK, 1.0) == 0.0
    assert hint_learnability("", TASK, 0.0) == 0.0
    # a full solution is not a hint, even with a mixed group
    assert hint_learnability("25+3-7", TASK, 0.5) == 0.0


def test_mutate_reward_by_hand():
    # learnability 1 - p̂: p̂ = 2/8 -> 0.75; p̂ in {0, 1} -> degenerate; invalid -> invalid
    assert mutate_reward(True, 2 / 8, -0.5, -1.0) == 0.75
    assert mutate_reward(True, 0.0, -0.5, -1.0) == -0.5
    assert mutate_reward(True, 1.0, -0.5, -1.0) == -0.5
    assert mutate_reward(False, 0.5, -0.5, -1.0) == -1.0


RANGE = Difficulty(2, 4, 1, 50, 1, 100)  # what `mutation_range` gives for 2-3 fresh numbers in 1..25


def test_child_validity():
    valid = lambda text, parent=TASK, max_edit=2: child_is_valid(parse_child(text), parent, max_edit, RANGE)  # noqa: E731
    assert valid("3 7 11>21")           # 11 + 7 + 3, certified by the solver
    assert not valid("7 3 25>21")       # same puzzle as the parent
    assert not valid("1 1>99")          # unsolvable
    assert not valid("garbage")         # malformed
    # a rewrite rather than an edit: 3 numbers removed + 5 added = 8 > 2 (the tutor's reward hack)
    assert edit_size(parse_child("1 1 1 1 1>1"), TASK) == 8
    assert not valid("1 1 1 1 1>1")
    assert edit_size(parse_child("3 7 11>21"), TASK) == 2 and edit_size(parse_child("3 7 25 1>22"), TASK) == 1
    assert not valid("3 7 11>21", max_edit=1)


def test_child_must_stay_in_the_curriculum_range():
    four = Task([25, 3, 7, 2], 23)
    assert valid_in_range("25 3 7 2 1>24", four) is False   # 5 numbers > the range's 4 (an edit of 1)
    assert valid_in_range("25 3 7 1>22", four) is True      # replace 2 by 1: 25 - 7 + 3 + 1
    assert valid_in_range("25 3 51>79", TASK) is False     # 51 > 50 (edit 2, solvable: 25 + 51 + 3)
    assert valid_in_range("25 3 7>175", TASK) is False     # target 175 > 100 (25 * 7, solvable)


def valid_in_range(text, parent):
    return child_is_valid(parse_child(text), parent, 2, RANGE)


def test_judge_parse_and_reward():
    assert parse_verdict("Y") is True and parse_verdict("N") is False and parse_verdict("maybe") is None
    assert parse_verdict("I think <answer>Y</answer>") is True
    assert judge_reward(True, True) == 1.0 and judge_reward(False, True) == 0.0 and judge_reward(None, False) == 0.0


def test_parsers_never_raise_on_garbage():
    for text in ("", "<answer>", "\x00\x01", "<answer>(((</answer>", "Y" * 10000, None):
        for t in TURNS.values():
            t.parse(text)
    assert extract_answer("a <answer>1+2</answer> b <answer>3+4</answer>") == "3+4"


def test_answer_extraction_from_chat_text():
    assert extract_answer("9 + 18 - 7 + 3 = 23\n\nThis is the answer.") == "9 + 18 - 7 + 3"
    assert extract_answer("25+3=28,28-7=21") == "25+3=28,28-7=21"  # a step list is not a claimed value
    assert extract_answer("\n  (25-7)+3  \nmore") == "(25-7)+3"
    assert extract_answer("Y") == "Y" and extract_answer("3 7 11>21") == "3 7 11>21"
