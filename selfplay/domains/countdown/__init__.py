"""Countdown: reach a target from given numbers with + - * /, each number used exactly once.

One noun per module, each a set of plain functions that tests and the curriculum use alone:

- `task`: the `Task` record and JSONL I/O (`{"numbers": [..], "target": N}` per line, unknown keys
  kept), and the tiny model's `3 7 25>21` text form.
- `verifier`: `verify(answer, numbers, target)`, the only ground truth of the project.
- `generator`: seeded random tasks, reachable by construction.
- `solver`: exhaustive search; certifies tasks, counts solutions, gives reference solutions.
- `mutations`: add / remove / replace a number, re-target, widen the range (the programmatic
  curriculum when the tutor's mutate turn is off).
"""

from selfplay.domains.countdown.generator import (Difficulty, generate_task, generate_tasks, random_chain, random_expr,
                                                  reachable_targets)
from selfplay.domains.countdown.mutations import MUTATIONS, mutate
from selfplay.domains.countdown.solver import Solution, flat_solvable, nearest_solution, solvable, solve
from selfplay.domains.countdown.task import Task, parse_task, read_tasks, write_tasks
from selfplay.domains.countdown.verifier import REASONS, Verdict, verify

__all__ = ["Difficulty", "reachable_targets", "flat_solvable", "nearest_solution", "generate_task", "generate_tasks", "random_chain", "random_expr", "MUTATIONS", "mutate",
           "Solution", "solvable", "solve", "Task", "parse_task", "read_tasks", "write_tasks", "REASONS", "Verdict",
           "verify"]
