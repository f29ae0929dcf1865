"""Tutor turns: hint, mutate, judge. Every reward is computed from verified student outcomes.

- hint: sees the task, a failed attempt and a verified solution found by the environment's
  exhaustive solver (environment compute: the tutor knows the answer), and writes either how many
  of the solution's tokens to reveal (`graph.hint_form: reveal`, the tiny model) or the hint text
  (`text`, chat models). The student's completion is forced to start with the hint.
  Reward = s * (1 - c * f): s = the student's success rate over its `hint_attempts` continuations,
  f = the share of the solution's tokens the hint reveals (capped at 1), c =
  `rewards.hint_reveal_cost`. A hint that is itself a full solution scores s = 0 (it taught
  nothing). So the tutor is paid for the least it must reveal *for the student to succeed*: among
  hints that work, the shorter pays more; a hint that fails pays 0 however short. The additive
  form s - c * f also paid failing hints for being short, and with 2 hints per group the tutor
  collapsed to revealing nothing in 3 of 6 runs (hinted success 2%); the others settled near 40%
  revealed and 37% success. Group: the H hints written for one failed group, or every hint of
  the iteration (`trainer.hint_baseline: batch`, which lets one hint per failed group learn).
  Alternative (`rewards.hint_reward: learnability`, `hint_learnability`): the hinted group's
  learnability, 1 - s when 0 < s < 1 and 0 when s is 0 or 1 (Absolute Zero's proposer reward
  applied to the hinted group; HiLL's idea that a hint is worth what it makes a non-degenerate
  GRPO group). A hint the student always finishes (s = 1) gives its group no policy gradient, so it
  pays nothing however it was reached; the best hint is the least that lets 1 of the attempts
  through. No reveal cost: revealing less is what lowers s.
- mutate: sees a parent task, writes a child task. Reward = learnability 1 - p̂ of the child under
  the student when 0 < p̂ < 1 (Absolute Zero's proposer reward), `mutate_degenerate` when p̂ is 0
  or 1, `mutate_invalid` when the child is malformed, a duplicate of its parent, more than a small
  edit away from it (`graph.mutate_max_edit` numbers added + removed), outside the curriculum's
  value/target ranges, or not solvable according to the exhaustive solver. Group: the M children
  of one parent.
- judge: sees the task and one attempt, writes Y or N. Reward = 1 if it agrees with the verifier.
  Group: the votes on one attempt, or, when the judge pays the student (`rewards.student_source:
  judge`), all votes of an episode's round. Advantages are class-balanced (grpo.class_balanced), so
  "always N" on a stream of mostly wrong attempts earns nothing.
"""

from __future__ import annotations

from collections import Counter

from roles import Turn
from roles.student import extract_answer
from selfplay.domains.countdown import Difficulty, Task, parse_task, solvable, verify


def hint_reward(hint: str, task: Task, success_rate: float, revealed: float, reveal_cost: float) -> float:
    if verify(hint, task.numbers, task.target).solved:
        success_rate = 0.0  # a full solution is not a hint
    return success_rate * (1.0 - reveal_cost * min(revealed, 1.0))


def hint_learnability(hint: str, task: Task, success_rate: float) -> float:
    # the mutate turn's learnability rule on the hinted group; a full solution is not a hint
    return mutate_reward(not verify(hint, task.numbers, task.target).solved, success_rate, 0.0, 0.0)


def parse_child(text: str) -> Task | None:
    return parse_task(extract_answer(text).replace(" >", ">").replace("> ", ">"))


def edit_size(child: Task, parent: Task) -> int:
    """Numbers added plus numbers removed (multiset symmetric difference): replace = 2, add/remove = 1."""
    c, p = Counter(child.numbers), Counter(parent.numbers)
    return sum(((c - p) + (p - c)).values())


def child_is_valid(child: Task | None, parent: Task, max_edit: int, bounds: Difficulty) -> bool:
    """A mutation is a small certified edit of its parent, inside the curriculum's mutation range
    (`bounds`: counts, values and targets).

    The edit bound matters: without it the tutor learned to write degenerate puzzles such as
    `1 1 1 1 1>1` (high learnability for a weak student, useless for the evaluation distribution).
    The range bound keeps every child within what the exhaustive solver certifies quickly."""
    d = bounds
    return (child is not None and child.key != parent.key and edit_size(child, parent) <= max_edit
            and d.min_count <= len(child.numbers) <= d.max_count
            and all(d.min_value <= n <= d.max_value for n in child.numbers)
            and d.min_target <= child.target <= d.max_target
            and solvable(child.numbers, child.target))


def mutate_reward(valid: bool, p_hat: float, degenerate: float, invalid: float) -> float:
    if not valid:
        return invalid
    if p_hat <= 0.0 or p_hat >= 1.0:
        return degenerate
    return 1.0 - p_hat


def parse_verdict(text: str) -> bool | None:
    a = extract_answer(text).upper()
    return True if a == "Y" else False if a == "N" else None


def judge_reward(predicted: bool | None, solved: bool) -> float:
    return 1.0 if predicted is not None and predicted == solved else 0.0


_TASK = {"numbers": [3, 7, 25], "target": 21}
HINT = Turn("tutor", "hint", extract_answer, hint_reward, {**_TASK, "attempt": "25+3=28,28-7=21", "solution": "25+3-7"})
MUTATE = Turn("tutor", "mutate", parse_child, mutate_reward, {**_TASK, "solve_bucket": 3})
JUDGE = Turn("tutor", "judge", parse_verdict, judge_reward, {**_TASK, "attempt": "25-7=18,18+3=21"})
