"""Curriculum: each iteration's episodes mix fresh tasks, replayed tasks and mutations.

- fresh: generated with the configured difficulty, skipping held-out tasks.
- replay: Prioritized Level Replay (Jiang et al. 2021). Score = learning potential p(1-p) of the
  student's unhinted solve rate on the task (p estimated with a +1/+2 prior so unseen tasks score
  0.25). P = (1 - staleness) * rank-prioritised scores (h(rank)^(1/T)) + staleness * P_stale, where
  P_stale is proportional to iterations since last played. Deviation: scores are solve-rate
  learnability rather than PLR's value-loss regret (there is no value function in GRPO).
- mutate: parents are drawn from the pool the same way; each parent spawns `mutate_group` episodes
  (the mutate GRPO group). With the tutor's mutate turn on, the tutor writes each child inside the
  episode; otherwise the programmatic operators (`countdown.mutate`) write it here.

The pool is plain data (JSON-able) so it is checkpointed and restored exactly.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

from selfplay.config import CurriculumCfg, RunConfig
from selfplay.domains.countdown import Difficulty, Task, generate_task, mutate


def mutation_range(c: CurriculumCfg) -> Difficulty:
    """Where every mutated child lives, programmatic or the tutor's: one more number than fresh tasks
    at most, numbers up to twice the fresh range (`widen_range`), the fresh tasks' targets."""
    return Difficulty(c.min_count, c.max_count + 1, c.min_value, 2 * c.max_value, 1, c.max_target, c.ops,
                      max(100, c.max_target))


@dataclass
class Assignment:
    task: Task
    mutate_group: str | None  # set: the tutor mutates `task` first (group id shared by siblings)


class Curriculum:
    def __init__(self, cfg: RunConfig, heldout: set[str]):
        self.cfg = cfg.curriculum
        self.tutor_mutates = cfg.graph.mutate
        c = self.cfg
        cap = max(100, c.max_target)
        self.difficulty = Difficulty(c.min_count, c.max_count, c.min_value, c.max_value, 1, c.max_target, c.ops, cap)
        self.mutation_difficulty = Difficulty(c.min_count, c.max_count + 1, c.min_value, c.max_value, 1, c.max_target,
                                              c.ops, cap)
        self.heldout = heldout
        self.rng = random.Random(cfg.seed)
        self.pool: dict[str, dict] = {}  # task id -> {"task": json, "attempts", "solved", "last"}
        self.n_fresh = 0

    # ---------------------------------------------------------------- sampling

    def fresh(self) -> Task:
        while True:
            t = generate_task(self.rng, self.difficulty)
            if t.key not in self.heldout:
                t.id = f"f{self.n_fresh}"
                self.n_fresh += 1
                return t

    def _solve_rate(self, e: dict) -> float:
        return (e["solved"] + 1) / (e["attempts"] + 2)

    def _pick(self, k: int, iteration: int, parents: bool = False) -> list[Task]:
        """PLR sample of k pool tasks; `parents=True` keeps only tasks that are not mutations.

        Mutating mutations let the curriculum drift: chains of tutor edits walked to degenerate
        puzzles (`1 11 1 1>1`) and the student collapsed on the evaluation distribution in one of
        three seeds. One edit away from a fresh task is as far as a child goes."""
        ids = [i for i in self.pool if not parents or self.pool[i]["task"].get("parent") is None]
        if not ids or k <= 0:
            return []
        scores = [(lambda p: p * (1 - p))(self._solve_rate(self.pool[i])) for i in ids]
        order = sorted(range(len(ids)), key=lambda j: -scores[j])
        rank_w = [0.0] * len(ids)
        for r, j in enumerate(order):
            rank_w[j] = (1.0 / (r + 1)) ** (1.0 / self.cfg.temperature)
        stale = [iteration - self.pool[i]["last"] for i in ids]
        zs, ss = sum(rank_w), sum(stale) or 1
        w = [(1 - self.cfg.staleness) * rw / zs + self.cfg.staleness * st / ss for rw, st in zip(rank_w, stale)]
        picks = self.rng.choices(ids, weights=w, k=k)
        out = []
        for i in picks:
            t = Task.from_json(self.pool[i]["task"])
            t.extra["solve_rate"] = self._solve_rate(self.pool[i])
            out.append(t)
        return out

    def next(self, iteration: int) -> list[Assignment]:
        """The episodes of one iteration, in a deterministic order."""
        c = self.cfg
        n = c.episodes_per_iter
        self._evict()
        n_replay = round(n * c.replay_fraction) if self.pool else 0
        n_mut = round(n * (1 - c.fresh_fraction - c.replay_fraction)) if self.pool else 0
        n_mut -= n_mut % c.mutate_group
        n_fresh = n - n_replay - n_mut
        out = [Assignment(self.fresh(), None) for _ in range(n_fresh)]
        out += [Assignment(t, None) for t in self._pick(n_replay, iteration)]
        for k, parent in enumerate(self._pick(n_mut // c.mutate_group, iteration, parents=True)):
            group = f"mut{iteration}.{k}"
            for j in range(c.mutate_group):
                if self.tutor_mutates:
                    out.append(Assignment(parent, group))
                else:
                    child = mutate(parent, self.rng, self.mutation_difficulty)
                    if child is None or child.key in self.heldout:
                        child = self.fresh()
                    else:
                        child.id = f"{parent.id}/p{iteration}.{k}.{j}"
                    out.append(Assignment(child, None))
        return out

    # ---------------------------------------------------------------- feedback

    def update(self, task: Task, attempts: int, solved: int, iteration: int) -> None:
        """Record unhinted outcomes of a played task (children of tutor mutations included)."""
        e = self.pool.get(task.id)
        if e is None:
            t = Task(task.numbers, task.target, task.id, task.parent, task.source)
            e = self.pool[task.id] = {"task": t.to_json(), "attempts": 0, "solved": 0, "last": iteration}
        e["attempts"] += attempts
        e["solved"] += solved
        e["last"] = iteration

    def _evict(self) -> None:
        """Drop the tasks beyond `pool_size`, the least learnable and stalest first: once per
        iteration (in `next`), not a scan of the pool per update (16 scans of a full pool cost
        ~30 ms an iteration, a quarter of a plain-GRPO iteration)."""
        extra = len(self.pool) - self.cfg.pool_size
        if extra > 0:
            def key(i):
                p = self._solve_rate(self.pool[i])
                return p * (1 - p), self.pool[i]["last"]

            for i in heapq.nsmallest(extra, self.pool, key=key):
                del self.pool[i]

    # ---------------------------------------------------------------- checkpoint

    def state(self) -> dict:
        return {"pool": self.pool, "n_fresh": self.n_fresh, "rng": _rng_to_json(self.rng.getstate())}

    def load(self, state: dict) -> None:
        self.pool, self.n_fresh = state["pool"], state["n_fresh"]
        self.rng.setstate(_rng_from_json(state["rng"]))


def _rng_to_json(s):
    return [s[0], list(s[1]), s[2]]


def _rng_from_json(s):
    return (s[0], tuple(s[1]), s[2])
