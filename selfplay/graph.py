"""The episode workflow as a LangGraph `StateGraph`; per episode:

    START ─► [mutate] ─► attempt ─► verify ─┬─ solved / no hint budget ─► [judge] ─► END
               tutor      student ×G         │
                             ▲               └─ all failed, hint rounds left ─► hint ─┐
                             └──────────────────────── (hints given) ◄─────────────────┘
                                    (hinted round: `hint_attempts` student samples per hint)

With `rewards.student_source: judge`, `verify ─► proxy_judge ─►` the same routes: the tutor votes
k times on every attempt of the round and the majority is the attempt's reward; the verifier's
verdict stays on the turn (the truth), and no separate [judge] node runs.

Hints (`graph.hint_*`): when every unhinted attempt failed, the environment's exhaustive solver
finds a verified solution (environment compute, counted in `env`): the solver's own, or with
`hint_solution: nearest` the flat solution that shares the longest prefix with one of the failed
attempts (the minimal correction of what the student wrote). The hint comes from the tutor,
who sees the solution and chooses how much of it to reveal (`hint_source: tutor`; `hint_form:
reveal` = it writes the number of solution tokens to show, `text` = it writes the hint), or is a
prefix of the solution of scheduled length (`schedule`), or the whole solution (`solution`). With
`hint_place: response` the hint tokens are teacher-forced as the start of the student's completion
and the student samples the rest from the plain task prompt, so what it learns is how to continue
a solution it will have to start alone at evaluation; with `prompt` the hint is prompt text.

One graph invocation plays a whole batch of episodes (`BatchState`): each node runs its turn for
every episode waiting at it, concurrently, and routes each of them on with the per-episode routes
drawn above; the next superstep is the first node, in the order mutate, attempt, verify,
proxy_judge, hint, judge, at which some episode waits. So all round-0 attempts are one fused model
call, all hints the next, and judging waits until no episode needs another hint round. (Until
2026-11 each episode was its own invocation: LangGraph's ~0.65 ms per invocation was most of the
graph's overhead over the raw sampler.) Nodes are async and await the shared `Generator`, whose
micro-batcher fuses the model calls of all episodes of a node. Each node names the batch's next
node in the `Command` it returns (no routing step between supersteps). Nodes, routes (the first
one is async: LangGraph runs a sync route in a worker thread) and the solver all run on the event
loop's thread, so batch membership, and with it every sample, is a function of the seed. The
routes enforce the budgets (`hint_rounds`), so LangGraph's recursion limit is never what stops an
episode. Token ids flow through the state with each turn (a revealed hint's ids are the
solution's own); nothing sampled is re-tokenised. Every turn record carries its reward when the
episode ends; advantages are added by the loop, which sees the groups that span episodes
(mutations of one parent).

Rewards (roles/): attempt = verifier outcome; hint = hinted success rate discounted by the revealed
share (or the hinted group's learnability, `rewards.hint_reward`); mutate = learnability of the
child under the student's unhinted attempts; judge = agreement with the verifier.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from typing import TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.types import Command

from roles import TURNS
from roles.tutor import child_is_valid, hint_learnability
from selfplay.config import RunConfig
from selfplay.curriculum import mutation_range
from selfplay.domains.countdown import Difficulty, Task, nearest_solution, solve, verify
from selfplay.generator import Generator, Sample
from selfplay.prompts import Prompts


class EpisodeState(TypedDict, total=False):
    episode_id: str
    iteration: int
    progress: float  # share of the run's budget spent before this iteration (the hint schedule reads it)
    task: Task  # the task given by the curriculum (the parent when mutating)
    mutate: bool  # start with a tutor mutation of `task`
    mutate_group: str  # GRPO group of the mutate turn (children of one parent)
    current: Task  # the task the student attempts
    solution: str | None  # the solver's solution of `current`, fetched when a group first fails
    hints: list[tuple[str, list[int]]]  # (text, token ids) of the current round's hints ([] in round 0)
    hint_round: int
    solved: bool  # an unhinted attempt solved the task
    solved_round: bool  # an attempt of the latest round solved the task
    turns: list[dict]
    at: str  # the node the episode waits at (END when done); unset before its first node


class BatchState(TypedDict):
    episodes: list[EpisodeState]


def unhinted_attempt(turn: dict) -> bool:
    """A student attempt of round 0: what solve rates, the curriculum and the mutate reward count."""
    return turn["kind"] == "attempt" and turn["hint_round"] == 0


def _turn(s: EpisodeState, role: str, kind: str, group: str, smp: Sample, prompt: str, adapter: str,
          version: int, parsed, hint_round: int = 0) -> dict:
    return {"episode_id": s["episode_id"], "iteration": s["iteration"], "role": role, "kind": kind,
            "adapter": adapter, "adapter_version": version, "group_id": group, "hint_round": hint_round,
            "hint": None, "forced": 0, "prompt": prompt, "behaviour_logprobs": smp.logprobs,
            "completion": smp.text, "parsed": None if parsed is None else str(parsed), "verdict": None,
            "reward": None, "advantage": None, "prompt_tokens": len(smp.prompt_ids),
            "completion_tokens": len(smp.ids), "prompt_ids": smp.prompt_ids, "completion_ids": smp.ids}


def _forced_turn(turn: dict, prompt_ids: list[int], forced: list[int], smp: Sample, text: str, hint: str) -> dict:
    """A hinted attempt whose completion starts with teacher-forced hint tokens: the completion is
    forced + sampled, with behaviour log-probs only for the sampled part (0 stands in for the rest)."""
    return {**turn, "hint": hint, "forced": len(forced), "prompt_ids": prompt_ids, "prompt_tokens": len(prompt_ids),
            "completion_ids": forced + smp.ids, "completion_tokens": len(forced) + len(smp.ids),
            "behaviour_logprobs": None if smp.logprobs is None else [0.0] * len(forced) + smp.logprobs,
            "completion": text}


def certify_child(child: Task | None, parent: Task, max_edit: int, bounds: Difficulty) -> bool:
    """`child_is_valid`, on the event loop's thread like every node and route: a worker thread's
    finishing time would decide which fused batch an episode's next call joins, and so which
    samples it draws; runs would not reproduce. The solver's cost is counted (`env/*`)."""
    return child_is_valid(child, parent, max_edit, bounds)


def schedule_share(progress: float, start: float, end: float) -> float:
    """UFT's cosine schedule: the share of the solution revealed, `start` at progress 0, 0 from `end` on."""
    if progress >= end:
        return 0.0
    return start * 0.5 * (1 + math.cos(math.pi * progress / end))


def build_graph(cfg: RunConfig, gen: Generator, prompts: Prompts, versions: dict[str, int],
                heldout: set[str] = frozenset(), env: dict | None = None):
    """Compile the episode graph. `versions` is read live (adapter version per role, for the record);
    `env` accumulates the environment's compute (solver calls and seconds)."""
    g, rw = cfg.graph, cfg.rewards
    pol = gen.policy
    student_cap, tutor_cap = cfg.generation.max_new_tokens, cfg.generation.tutor_max_new_tokens
    bounds = mutation_range(cfg.curriculum)
    hindsight, cur = cfg.trainer.hindsight_nll > 0, cfg.curriculum
    env = env if env is not None else {}

    def vars_of(t: Task) -> dict:
        return {"numbers": t.numbers, "target": t.target}

    async def ask(role: str, kind: str, n: int, cap: int, **vars) -> tuple[str, list[Sample]]:
        text = prompts.render(kind, **vars)
        return text, await gen.generate(role, pol.encode(text), n, cap)

    def relabelled(numbers: list[int], value) -> list[int] | None:
        """Hindsight: prompt ids of the task a failed attempt did solve (the numbers it used, target =
        its value), when that is a task of the training distribution and not a held-out one."""
        if value is None or value.denominator != 1 or not 1 <= value <= cur.max_target or value == sum(numbers):
            return None
        task = Task(numbers, int(value))
        return None if task.key in heldout else pol.encode(prompts.render("attempt", **vars_of(task), hint=None))

    def used_numbers(turn: dict) -> list[int] | None:
        """The numbers an answer used instead of the task's (`trainer.hindsight_numbers`), shuffled by
        a seeded stream, when they could be a fresh task's; else None."""
        used = [int(x) for x in re.findall(r"\d+", turn["parsed"] or "")]  # the expression's literals
        if not cur.min_count <= len(used) <= cur.max_count or not all(cur.min_value <= x <= cur.max_value for x in used):
            return None
        random.Random(f"{cfg.seed}:{turn['group_id']}:{turn['completion']}").shuffle(used)
        return used

    async def solution_of(t: Task) -> str | None:
        t0 = time.perf_counter()
        sol = solve(t.numbers, t.target, False)
        env["solver_calls"] = env.get("solver_calls", 0) + 1
        env["solver_seconds"] = env.get("solver_seconds", 0.0) + time.perf_counter() - t0
        return sol.expr

    async def mutate(s: EpisodeState) -> dict:
        parent = s["task"]
        solve_bucket = min(9, int(10 * parent.extra.get("solve_rate", 0.0)))
        text, [smp] = await ask("tutor", "mutate", 1, tutor_cap, **vars_of(parent), solve_bucket=solve_bucket)
        child = TURNS["mutate"].parse(smp.text)
        valid = certify_child(child, parent, g.mutate_max_edit, bounds) and child.key not in heldout
        turn = _turn(s, "tutor", "mutate", s["mutate_group"], smp, text, pol.adapters["tutor"],
                     versions["tutor"], child.key if child else None)
        turn["verdict"] = "valid" if valid else "invalid"
        if valid:
            child.id, child.parent, child.source = f"{s['episode_id']}/child", parent.id, "tutor"
        return {"current": child if valid else parent, "turns": s["turns"] + [turn]}

    async def hinted_attempts(s: EpisodeState, j: int, hint: str, forced: list[int]) -> list[dict]:
        """The attempts on hint j: `forced` (the hint's token ids) starts each completion, or the
        hint text goes in the prompt (`hint_place: prompt`)."""
        t, r = s["current"], s["hint_round"]
        group, parse = f"{s['episode_id']}:h{r}.{j}", TURNS["attempt"].parse
        meta = ("student", "attempt", group)
        if g.hint_place == "prompt":
            text, samples = await ask("student", "attempt", g.hint_attempts, student_cap, **vars_of(t), hint=hint)
            return [_turn(s, *meta, smp, text, pol.adapters["student"], versions["student"], parse(smp.text), r)
                    | {"hint": hint} for smp in samples]
        first = next(x for x in s["turns"] if unhinted_attempt(x))  # the plain task prompt, as round 0 had it
        text, prompt_ids = first["prompt"], first["prompt_ids"]
        cap = max(1, student_cap - len(forced))
        samples = await gen.generate("student", prompt_ids + forced, g.hint_attempts, cap)
        out = []
        for smp, full in zip(samples, pol.decode_batch([forced + smp.ids for smp in samples])):
            turn = _turn(s, *meta, smp, text, pol.adapters["student"], versions["student"], parse(full), r)
            out.append(_forced_turn(turn, prompt_ids, forced, smp, full, hint))
        return out

    async def attempt(s: EpisodeState) -> dict:
        t, r = s["current"], s["hint_round"]
        if r == 0:
            text, samples = await ask("student", "attempt", g.group_size, student_cap, **vars_of(t), hint=None)
            new = [_turn(s, "student", "attempt", f"{s['episode_id']}:a", smp, text, pol.adapters["student"],
                         versions["student"], TURNS["attempt"].parse(smp.text)) for smp in samples]
        else:
            new = [x for xs in await asyncio.gather(*(hinted_attempts(s, j, *h) for j, h in enumerate(s["hints"])))
                   for x in xs]
        return {"turns": s["turns"] + new}

    async def verify_node(s: EpisodeState) -> dict:
        t, r = s["current"], s["hint_round"]
        turns, solved_round = [], False
        relabel = hindsight and (r == 0 or cfg.trainer.hindsight_hinted)  # this round's failures
        for turn in s["turns"]:
            if turn["kind"] == "attempt" and turn["verdict"] is None:
                v = verify(turn["parsed"] or "", t.numbers, t.target)
                turn = {**turn, "verdict": v.reason, "reward": TURNS["attempt"].reward(v, rw.format_credit)}
                if r > 0 and v.solved and hindsight and cfg.trainer.hindsight_solved_hinted:  # rationalization
                    turn["hindsight_ids"] = next(x for x in s["turns"] if unhinted_attempt(x))["prompt_ids"]
                elif relabel and v.reason == "wrong_value":
                    turn["hindsight_ids"] = relabelled(t.numbers, v.value)
                elif relabel and cfg.trainer.hindsight_numbers and v.reason == "bad_numbers" and v.value is not None:
                    used = used_numbers(turn)
                    turn["hindsight_ids"] = used and relabelled(used, v.value)
                solved_round |= v.solved
            turns.append(turn)
        out = {"turns": turns, "solved_round": solved_round}
        if r == 0:
            out["solved"] = solved_round
            p_hat = sum(x["verdict"] == "solved" for x in turns if unhinted_attempt(x)) / g.group_size
            for i, x in enumerate(turns):
                if x["kind"] == "mutate":
                    turns[i] = {**x, "reward": TURNS["mutate"].reward(x["verdict"] == "valid", p_hat,
                                                                      rw.mutate_degenerate, rw.mutate_invalid)}
        else:
            hint_ids = [i for i, x in enumerate(turns) if x["group_id"] == f"{s['episode_id']}:H{r}"]
            for j, i in enumerate(hint_ids):  # hint j of round r was attempted as group h{r}.{j}
                x = turns[i]
                grp = f"{s['episode_id']}:h{r}.{j}"
                rate = sum(a["verdict"] == "solved" for a in turns if a["group_id"] == grp) / g.hint_attempts
                reward = (hint_learnability(x["hint"], t, rate) if rw.hint_reward == "learnability"
                          else TURNS["hint"].reward(x["hint"], t, rate, x["revealed"], rw.hint_reveal_cost))
                turns[i] = {**x, "reward": reward}
        return out

    async def solution_for(s: EpisodeState, failed: list[dict]) -> tuple[str | None, dict]:
        """The solution a hint is cut from, and the failed attempt the tutor is shown beside it."""
        t = s["current"]
        if g.hint_solution == "nearest":
            t0 = time.perf_counter()
            near = nearest_solution(t.numbers, t.target, [x["parsed"] or x["completion"] for x in failed])
            env["solver_calls"] = env.get("solver_calls", 0) + 1
            env["solver_seconds"] = env.get("solver_seconds", 0.0) + time.perf_counter() - t0
            if near is not None:
                return near[0], failed[near[1]]
        return s.get("solution") or await solution_of(t), failed[-1]

    async def hint(s: EpisodeState) -> dict:
        t, r = s["current"], s["hint_round"] + 1
        failed = [x for x in s["turns"] if x["kind"] == "attempt" and x["verdict"] != "solved"]
        solution, shown = await solution_for(s, failed)
        if solution is None:  # unsolvable (a user's task file): nothing to reveal
            return {"hint_round": r, "hints": [], "solution": None}
        sol_tokens = pol.tokens(solution)
        if g.hint_source == "solution":
            return {"hint_round": r, "hints": [(solution, sol_tokens)], "solution": solution}
        if g.hint_source == "schedule":
            k = math.floor(schedule_share(s.get("progress", 0.0), g.schedule_start, g.schedule_end) * len(sol_tokens))
            hints = [(pol.decode(sol_tokens[:k]), sol_tokens[:k])] if k else []
            return {"hint_round": r, "hints": hints, "solution": solution}
        text, samples = await ask("tutor", "hint", g.hints_per_round, tutor_cap, **vars_of(t),
                                  attempt=shown["parsed"] or shown["completion"], solution=solution)
        new, hints = [], []
        for smp in samples:
            turn = _turn(s, "tutor", "hint", f"{s['episode_id']}:H{r}", smp, text, pol.adapters["tutor"],
                         versions["tutor"], TURNS["hint"].parse(smp.text), r)
            if g.hint_form == "reveal":  # the tutor chose how many solution tokens to show: force those ids
                k = int(turn["parsed"]) if turn["parsed"].isdigit() else 0
                ids = sol_tokens[: min(k, len(sol_tokens))]
                turn["hint"] = pol.decode(ids)
            else:
                turn["hint"], ids = turn["parsed"], pol.tokens(turn["parsed"])
            turn["revealed"] = len(ids) / max(len(sol_tokens), 1)
            new.append(turn)
            hints.append((turn["hint"], ids))
        return {"turns": s["turns"] + new, "hint_round": r, "hints": hints, "solution": solution}

    def votes(s: EpisodeState, group: str, samples: list[Sample], prompt: str, truth: bool, r: int = 0) -> list[dict]:
        """One judge turn per sampled verdict, paid for agreeing with the verifier's `truth`."""
        out = []
        for smp in samples:
            pred = TURNS["judge"].parse(smp.text)
            turn = _turn(s, "tutor", "judge", group, smp, prompt, pol.adapters["tutor"], versions["tutor"], pred,
                         hint_round=r)
            turn["verdict"] = "correct" if truth else "incorrect"
            turn["reward"] = TURNS["judge"].reward(pred, truth)
            out.append(turn)
        return out

    async def judge(s: EpisodeState) -> dict:
        t = s["current"]
        rng = random.Random(f"{cfg.seed}:{s['episode_id']}")
        pool = [x for x in s["turns"] if unhinted_attempt(x)]
        solved = [x for x in pool if x["verdict"] == "solved"]
        picks = []
        for _ in range(min(g.judge_attempts, len(pool))):  # balance the classes when both exist
            picks.append(rng.choice(solved if solved and rng.random() < 0.5 else pool))
        asks = [ask("tutor", "judge", g.judge_votes, tutor_cap, **vars_of(t), attempt=p["parsed"] or "")
                for p in picks]
        new = [x for k, (p, (text, samples)) in enumerate(zip(picks, await asyncio.gather(*asks)))
               for x in votes(s, f"{s['episode_id']}:J{k}", samples, text, p["verdict"] == "solved")]
        return {"turns": s["turns"] + new}

    async def proxy_judge(s: EpisodeState) -> dict:
        """rewards.student_source=judge: the tutor judges every attempt of this round with k votes;
        the majority is the attempt's reward (the proxy), the verifier's verdict stays beside it
        (the truth). Each vote is a judge turn, paid for agreeing with the verifier; the judge's GRPO
        group is all k·G votes of the round (per attempt, k = 1 would leave no baseline)."""
        t, r = s["current"], s["hint_round"]
        todo = [i for i, x in enumerate(s["turns"]) if x["kind"] == "attempt" and x["hint_round"] == r]
        asks = [ask("tutor", "judge", g.judge_votes, tutor_cap, **vars_of(t), attempt=s["turns"][i]["parsed"] or "")
                for i in todo]
        turns, new = list(s["turns"]), []
        for i, (text, samples) in zip(todo, await asyncio.gather(*asks)):
            mine = votes(s, f"{s['episode_id']}:P{r}", samples, text, turns[i]["verdict"] == "solved", r)
            share = sum(v["parsed"] == "True" for v in mine) / len(mine)
            turns[i] = {**turns[i], "judge": share, "reward": 1.0 if share > 0.5 else 0.0}
            new += mine
        return {"turns": turns + new}

    def start_route(s: EpisodeState) -> str:
        return "mutate" if s.get("mutate") and g.mutate else "attempt"

    def end_route(s: EpisodeState) -> str:  # (a judge-paid student had every attempt judged)
        return "judge" if g.judge and g.judge_attempts > 0 and rw.student_source == "verifier" else END

    def after_verify(s: EpisodeState) -> str:
        if not s["solved_round"] and g.hint and s["hint_round"] < g.hint_rounds:
            return "hint"
        return end_route(s)

    def after_hint(s: EpisodeState) -> str:
        return "attempt" if s["hints"] else end_route(s)

    verify_next = (lambda s: "proxy_judge") if rw.student_source == "judge" else after_verify
    nodes = {"mutate": (mutate, lambda s: "attempt"), "attempt": (attempt, lambda s: "verify"),
             "verify": (verify_node, verify_next), "proxy_judge": (proxy_judge, after_verify),
             "hint": (hint, after_hint), "judge": (judge, lambda s: END)}
    order = list(nodes)  # a batch step runs the first node (in this order) that an episode waits at

    def at(s: EpisodeState) -> str:
        return s.get("at") or start_route(s)

    def batched(name: str):
        fn, route = nodes[name]

        async def node(b: BatchState) -> Command:
            """Run `name` for every episode waiting at it, concurrently (one fused batch of model
            calls), route each episode on to its next node, and go to the batch's next node."""
            eps = list(b["episodes"])
            todo = [i for i, s in enumerate(eps) if at(s) == name]
            for i, out in zip(todo, await asyncio.gather(*(fn(eps[i]) for i in todo))):
                eps[i] = {**eps[i], **out}
                eps[i]["at"] = route(eps[i])
            return Command(update={"episodes": eps}, goto=next_node(eps))
        return node

    def next_node(eps: list[EpisodeState]) -> str:
        waiting = {at(s) for s in eps}
        return next((n for n in order if n in waiting), END)

    async def first_node(b: BatchState) -> str:  # async: LangGraph runs a sync route in a worker thread
        return next_node(b["episodes"])

    # each node names the next itself (a Command): the separate routing steps between supersteps
    # cost LangGraph ~0.3 ms of the graph's ~5.5 ms fixed cost per 16 episodes (README Benchmarks)
    sg = StateGraph(BatchState)
    for name in order:
        sg.add_node(name, batched(name), destinations=(*order, END))
    sg.add_conditional_edges(START, first_node, [*order, END])
    return sg.compile()


def episode_input(episode_id: str, iteration: int, task: Task, mutate_group: str | None,
                  progress: float = 0.0) -> EpisodeState:
    return {"episode_id": episode_id, "iteration": iteration, "progress": progress, "task": task, "current": task,
            "mutate": mutate_group is not None, "mutate_group": mutate_group or "", "solution": None, "hints": [],
            "hint_round": 0, "solved": False, "solved_round": False, "turns": []}


async def run_episodes(graph, inputs: list[EpisodeState], concurrency: int) -> list[EpisodeState]:
    """Play the episodes, `concurrency` at a time: each chunk is one invocation of the batch graph."""
    out = []
    for k in range(0, len(inputs), concurrency):
        res = await graph.ainvoke({"episodes": inputs[k: k + concurrency]}, config={"recursion_limit": 100})
        out += res["episodes"]
    return out
