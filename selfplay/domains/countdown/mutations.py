"""Mutation operators (add / remove / replace a number, re-target, widen the value range): the
programmatic curriculum when the tutor's mutate turn is off. Each returns a task certified
solvable by the solver, or None."""

from __future__ import annotations

import random

from selfplay.domains.countdown.generator import Difficulty, random_chain
from selfplay.domains.countdown.solver import solvable
from selfplay.domains.countdown.task import Task


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


