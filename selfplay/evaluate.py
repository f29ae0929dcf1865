"""Evaluation on a fixed held-out set: no hints, no tutor in the loop.

- sampled solve rate: k samples per task at the rollout temperature; greedy solve rate: one
  argmax decode per task. Both are means over tasks of the per-task solve fraction, with the
  standard error over tasks (tasks are the unit of sampling), broken down by number count.
- how honest the task set is: the share solved by the plain sum of the numbers and by some flat
  `+`/`-` expression, and the sampled solve rate on the tasks no flat `+`/`-` expression solves
  (the shortcut a non-aiming prior finds by habit).
- failure reasons of the sampled attempts (wrong_value / bad_arithmetic / ...).
- judge: the tutor's greedy verdicts on held-out attempts of both classes (the solver's right
  answers, the student's mostly wrong ones) against the verifier: balanced accuracy, precision,
  recall.
`compare` gives the paired (same tasks) difference between two evaluations with its SE.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from roles import TURNS
from selfplay.config import EvalCfg, RunConfig
from selfplay.domains.countdown import Difficulty, Task, flat_solvable, generate_tasks, solve, verify
from selfplay.prompts import Prompts


def heldout_tasks(cfg: EvalCfg) -> list[Task]:
    d = Difficulty(cfg.min_count, cfg.max_count, 1, cfg.max_value, 1, cfg.max_target, cfg.ops, max(100, cfg.max_target))
    return generate_tasks(cfg.n_tasks, cfg.seed, d, prefix="heldout")


def _mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return 0.0, 0.0
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return m, math.sqrt(var / n)


def _complete(backend, prompts, adapter, cap, max_batch, temperature=None):
    outs = []
    for i in range(0, len(prompts), max_batch):
        chunk = prompts[i: i + max_batch]
        outs += backend.complete(chunk, [adapter] * len(chunk), [cap] * len(chunk), temperature=temperature)
    return outs


def evaluate(policy, backend, prompts: Prompts, tasks: list[Task], cfg: RunConfig, samples: int | None = None,
             base: bool = False, judge_attempts: int | None = None) -> dict:
    k = samples or cfg.eval.samples
    adapter = "__base__" if base else policy.adapters["student"]
    cap, mb = cfg.generation.max_new_tokens, cfg.generation.max_batch
    ids = [policy.encode(prompts.render("attempt", numbers=t.numbers, target=t.target, hint=None)) for t in tasks]

    def solved(outs, reps):
        per_task = [[] for _ in tasks]
        reasons = Counter()
        for j, o in enumerate(outs):
            t = tasks[j % len(tasks)]
            v = verify(TURNS["attempt"].parse(policy.decode(o.ids)), t.numbers, t.target)
            per_task[j % len(tasks)].append(float(v.solved))
            reasons[v.reason] += 1
        return [sum(x) / reps for x in per_task], reasons

    sampled, reasons = solved(_complete(backend, ids * k, adapter, cap, mb), k)
    greedy, _ = solved(_complete(backend, ids, adapter, cap, mb, temperature=0.0), 1)
    m, se = _mean_se(sampled)
    gm, gse = _mean_se(greedy)
    by_count = defaultdict(list)
    for t, s in zip(tasks, sampled):
        by_count[len(t.numbers)].append(s)
    flat = [flat_solvable(t.numbers, t.target) for t in tasks]
    nonflat = [s for s, f in zip(sampled, flat) if not f]
    total = sum(reasons.values())
    out = {"n_tasks": len(tasks), "samples": k, "solve_rate": m, "solve_rate_se": se,
           "greedy_solve_rate": gm, "greedy_solve_rate_se": gse,
           "by_count": {str(c): _mean_se(v)[0] for c, v in sorted(by_count.items())},
           "share_sum_solvable": sum(sum(t.numbers) == t.target for t in tasks) / len(tasks),
           "share_flat_solvable": sum(flat) / len(tasks),
           "solve_rate_nonflat": _mean_se(nonflat)[0], "solve_rate_nonflat_se": _mean_se(nonflat)[1],
           "reasons": {r: n / total for r, n in reasons.items()}, "per_task": sampled}
    n_judge = cfg.eval.judge_attempts if judge_attempts is None else judge_attempts
    if n_judge and not base:
        out.update(judge_metrics(policy, backend, prompts, tasks[:n_judge], cfg))
    return out


def judge_metrics(policy, backend, prompts: Prompts, tasks: list[Task], cfg: RunConfig) -> dict:
    """The tutor's greedy verdicts on held-out attempts of BOTH classes, scored against the verifier.

    Right answers are rare among the student's samples, so half the tasks give the solver's solution
    (a right answer written as the student writes: a flat expression when one exists) and half give
    one sampled student attempt (mostly wrong); every label is the verifier's. Returns accuracy,
    balanced accuracy (mean per-class recall: "always N" scores 0.5), precision and recall of Y,
    and the class counts."""
    cap, mb = cfg.generation.max_new_tokens, cfg.generation.max_batch
    half = len(tasks) // 2
    ids = [policy.encode(prompts.render("attempt", numbers=t.numbers, target=t.target, hint=None)) for t in tasks[half:]]
    sampled = [TURNS["attempt"].parse(policy.decode(o.ids))
               for o in _complete(backend, ids, policy.adapters["student"], cap, mb)]
    answers = [solve(t.numbers, t.target, False).expr or "" for t in tasks[:half]] + sampled
    truth = [verify(a, t.numbers, t.target).solved for a, t in zip(answers, tasks)]
    jids = [policy.encode(prompts.render("judge", numbers=t.numbers, target=t.target, attempt=a))
            for a, t in zip(answers, tasks)]
    outs = _complete(backend, jids, policy.adapters["tutor"], cfg.generation.tutor_max_new_tokens, mb,
                     temperature=0.0)
    preds = [TURNS["judge"].parse(policy.decode(o.ids)) for o in outs]
    tp = sum(p is True and tr for p, tr in zip(preds, truth))
    n_pos, n_neg = sum(truth), len(truth) - sum(truth)
    tn = sum(p is False and not tr for p, tr in zip(preds, truth))
    said_yes = sum(p is True for p in preds)
    recalls = [r for r, n in ((tp / max(n_pos, 1), n_pos), (tn / max(n_neg, 1), n_neg)) if n]
    return {"judge_accuracy": (tp + tn) / max(len(truth), 1), "judge_balanced_accuracy": sum(recalls) / len(recalls),
            "judge_precision": tp / said_yes if said_yes else float("nan"), "judge_recall": tp / max(n_pos, 1),
            "judge_positives": n_pos, "judge_negatives": n_neg}


def compare(before: dict, after: dict) -> dict:
    """Paired difference of sampled solve rates on the same tasks, with its standard error."""
    d = [a - b for a, b in zip(after["per_task"], before["per_task"])]
    m, se = _mean_se(d)
    return {"delta": m, "delta_se": se, "z": m / se if se > 0 else float("inf") if m > 0 else 0.0}
