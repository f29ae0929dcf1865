"""What a run logs about its turns (the CleanRL-style `student/`, `tutor/`, `judge/` metrics of one
iteration), where a judge-paid run's proxy reward parts from the verifier's truth, and where a
learned tutor's hints collapsed to the whole solution.
"""

from __future__ import annotations

from collections import defaultdict

from selfplay.graph import unhinted_attempt


def turn_metrics(turns: list[dict]) -> dict[str, float]:
    """One iteration's metrics from its turns (NaN ones, of kinds absent this iteration, dropped)."""

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else float("nan")

    att = [t for t in turns if unhinted_attempt(t)]
    hinted = [t for t in turns if t["kind"] == "attempt" and t["hint_round"] > 0]
    m = {"student/solve_rate": mean(t["verdict"] == "solved" for t in att),
         "student/true_solve_rate": mean(t["verdict"] == "solved" for t in att),  # the verifier, whatever pays
         "student/reward": mean(t["reward"] for t in att),
         "student/bad_arithmetic": mean(t["verdict"] == "bad_arithmetic" for t in att),
         "student/completion_tokens": mean(t["completion_tokens"] for t in att),
         "student/hinted_solve_rate": mean(t["verdict"] == "solved" for t in hinted),
         "student/hinted_forced_tokens": mean(t["forced"] for t in hinted)}
    judged = [t for t in att if t.get("judge") is not None]  # rewards.student_source=judge
    if judged:
        wrong = [t for t in judged if t["verdict"] != "solved"]
        right = [t for t in judged if t["verdict"] == "solved"]
        m["student/judge_reward"] = mean(t["reward"] for t in judged)  # the proxy that pays
        m["judge/false_accept_rate"] = mean(t["reward"] > 0 for t in wrong)  # what the student can exploit
        m["judge/false_reject_rate"] = mean(t["reward"] == 0 for t in right)
    for kind in ("hint", "mutate", "judge"):
        mine = [t for t in turns if t["kind"] == kind]
        if mine:
            m[f"tutor/{kind}_reward"] = mean(t["reward"] for t in mine)
            m[f"tutor/{kind}_turns"] = len(mine)
    hints = [t for t in turns if t["kind"] == "hint"]
    if hints:
        m["tutor/hint_revealed"] = mean(t["revealed"] for t in hints)
        m["tutor/hint_empty"] = mean(t["revealed"] == 0 for t in hints)  # a collapsed tutor reveals nothing
        answers = defaultdict(list)
        for t in hints:
            answers[t["group_id"]].append(t["completion"])
        # a group of identical hints teaches the tutor nothing: equal rewards drop it, unequal ones
        # give the same tokens opposite advantages (a frozen tutor: README Results, "keeps learning")
        m["tutor/hint_groups_identical"] = mean(len(set(a)) == 1 for a in answers.values() if len(a) > 1)
    mut = [t for t in turns if t["kind"] == "mutate"]
    if mut:
        m["tutor/mutate_valid_rate"] = mean(t["verdict"] == "valid" for t in mut)
    return {k: v for k, v in m.items() if v == v}  # drop NaN


def parting_iteration(iterations: list[int], proxy: list[float], truth: list[float], window: int = 5,
                      margin: float = 0.1) -> int | None:
    """Where a proxy reward and the truth part (Goodhart): the first iteration of the first run of
    `window` consecutive iterations whose gap (proxy - truth) exceeds the mean gap of the first
    `window` iterations by more than `margin`: a sustained departure, not a noisy spike. None = the
    two never parted."""
    if len(proxy) < 2 * window:
        return None
    gap = [p - q for p, q in zip(proxy, truth)]
    base, run = sum(gap[:window]) / window, 0
    for i, g in enumerate(gap):
        run = run + 1 if g - base > margin else 0
        if run == window:
            return iterations[i - window + 1]
    return None


def goodhart(rows: list[dict], window: int = 5, margin: float = 0.1) -> dict:
    """Proxy (judge reward) against truth (verifier solve rate) over the run's iterations."""
    rows = [r for r in rows if "student/judge_reward" in r]
    its, proxy, truth = ([r[k] for r in rows] for k in ("iteration", "student/judge_reward", "student/true_solve_rate"))
    tail = slice(-window, None)
    return {"iteration": parting_iteration(its, proxy, truth, window, margin), "window": window, "margin": margin,
            "proxy_last": sum(proxy[tail]) / max(len(proxy[tail]), 1),
            "truth_last": sum(truth[tail]) / max(len(truth[tail]), 1)}


FULL_HINT = 0.99  # a mean revealed share at which (nearly) every hint of an iteration is the whole solution
COLLAPSE_WINDOW = 50  # iterations of whole-solution hints that make a collapse, not a passing spike


def hint_collapse(rows: list[dict], window: int = COLLAPSE_WINDOW) -> int | None:
    """The first iteration of the first `window` consecutive hinted iterations whose hints revealed
    the whole solution (`tutor/hint_revealed` >= FULL_HINT), or None. A whole solution pays 0
    (roles/tutor.py), so such an iteration's hint rewards are all 0: the batch baseline drops the
    batch and, without the tutor's KL, nothing trains the tutor back. The run goes on as SFT on
    the solver's solutions that also pays for a tutor (16x runs: README Results)."""
    hinted = [r for r in rows if "tutor/hint_revealed" in r]
    run = 0
    for i, r in enumerate(hinted):
        run = run + 1 if r["tutor/hint_revealed"] >= FULL_HINT else 0
        if run == window:
            return hinted[i - window + 1]["iteration"]
    return None
