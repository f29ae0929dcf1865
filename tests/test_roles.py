import pytest

from roles import TURNS
from roles.student import attempt_reward, extract_answer
from roles.tutor import child_is_valid, edit_size, hint_reward, judge_reward, mutate_reward, parse_child, parse_verdict
from selfplay.domains.countdown import Task, verify

TASK = Task([25, 3, 7], 21, id="p")


def test_attempt_reward_by_hand():
    assert attempt_reward(verify("(25-7)+3", TASK.numbers, 21), 0.1) == 1.0
    assert attempt_reward(verify("(25+7)+3", TASK.numbers, 21), 0.1) == 0.1   # well formed, 35
    assert attempt_reward(verify("(25+7)+4", TASK.numbers, 21), 0.1) == 0.0   # wrong numbers
    assert attempt_reward(verify("((25", TASK.numbers, 21), 0.1) == 0.0


def test_hint_reward_by_hand():
    # 3 of 4 hinted attempts solved -> 0.75; a hint that is itself a full solution earns the leak value
    assert hint_reward("25-7", TASK, 0.75, leak=0.0) == 0.75
    assert hint_reward("(25-7)+3", TASK, 1.0, leak=0.0) == 0.0


def test_mutate_reward_by_hand():
    # learnability 1 - p̂: p̂ = 2/8 -> 0.75; p̂ in {0, 1} -> degenerate; invalid -> invalid
    assert mutate_reward(True, 2 / 8, -0.5, -1.0) == 0.75
    assert mutate_reward(True, 0.0, -0.5, -1.0) == -0.5
    assert mutate_reward(True, 1.0, -0.5, -1.0) == -0.5
    assert mutate_reward(False, 0.5, -0.5, -1.0) == -1.0


def test_child_validity():
    assert child_is_valid(parse_child("3 7 11>21"), TASK)      # 11 + 7 + 3, certified by the solver
    assert not child_is_valid(parse_child("7 3 25>21"), TASK)  # same puzzle as the parent
    assert not child_is_valid(parse_child("1 1>99"), TASK)     # unsolvable
    assert not child_is_valid(parse_child("garbage"), TASK)    # malformed
    # a rewrite rather than an edit: 3 numbers removed + 5 added = 8 > 2 (the tutor's reward hack)
    assert edit_size(parse_child("1 1 1 1 1>1"), TASK) == 8
    assert not child_is_valid(parse_child("1 1 1 1 1>1"), TASK)
    assert edit_size(parse_child("3 7 11>21"), TASK) == 2 and edit_size(parse_child("3 7 25 1>22"), TASK) == 1
    assert not child_is_valid(parse_child("3 7 11>21"), TASK, max_edit=1)


def test_judge_parse_and_reward():
    assert parse_verdict("Y") is True and parse_verdict("N") is False and parse_verdict("maybe") is None
    assert parse_verdict("I think <answer>Y</answer>") is True
    assert judge_reward(True, True) == 1.0 and judge_reward(False, True) == 0.0 and judge_reward(None, False) == 0.0


def test_parsers_never_raise_on_garbage():
    for text in ("", "<answer>", "\x00\x01", "<answer>(((</answer>", "Y" * 10000, None):
        for t in TURNS.values():
            t.parse(text)
    assert extract_answer("a <answer>1+2</answer> b <answer>3+4</answer>") == "3+4"
