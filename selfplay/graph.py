"""The episode workflow as a LangGraph `StateGraph`.

    START ─► [mutate] ─► attempt ─► verify ─┬─ solved / no hint budget ─► [judge] ─► END
               tutor      student ×G         │
                             ▲               └─ all failed, hint rounds left ─► hint (tutor ×H)
                             └───────────────────────────────────────────────────────┘
                                    (hinted round: `hint_attempts` student samples per hint)

Nodes are async and await the shared `Generator`, whose micro-batcher fuses the model calls of all
episodes in flight. The router enforces the budgets (`hint_rounds`), so LangGraph's recursion limit
is never what stops an episode. Token ids flow through the state with each turn; nothing is
re-tokenised. Every turn record carries its reward when the episode ends; advantages are added by
the loop, which sees the groups that span episodes (mutations of one parent).

Rewards (roles/): attempt = verifier outcome; hint = success rate of its hinted attempts;
mutate = learnability of the child under the student's unhinted attempts; judge = agreement
with the verifier.
"""

from __future__ import annotations

import asyncio
import random
from typing import TypedDict

from langgraph.graph import END, START, StateGraph

from roles import TURNS
from roles.tutor import child_is_valid
from selfplay.config import RunConfig
from selfplay.curriculum import mutation_range
from selfplay.domains.countdown import Difficulty, Task, verify
from selfplay.generator import Generator, Sample
from selfplay.prompts import Prompts


class EpisodeState(TypedDict, total=False):
    episode_id: str
    iteration: int
    task: Task  # the task given by the curriculum (the parent when mutating)
    mutate: bool  # start with a tutor mutation of `task`
    mutate_group: str  # GRPO group of the mutate turn (children of one parent)
    current: Task  # the task the student attempts
    hints: list[str]  # hints of the current round ([] in round 0)
    hint_round: int
    solved: bool  # an unhinted attempt solved the task
    solved_round: bool  # an attempt of the latest round solved the task
    turns: list[dict]


def unhinted_attempt(turn: dict) -> bool:
    """A student attempt of round 0: what solve rates, the curriculum and the mutate reward count."""
    return turn["kind"] == "attempt" and turn["hint_round"] == 0


def _turn(s: EpisodeState, role: str, kind: str, group: str, smp: Sample, prompt: str, adapter: str,
          version: int, parsed, hint_round: int = 0) -> dict:
    return {"episode_id": s["episode_id"], "iteration": s["iteration"], "role": role, "kind": kind,
            "adapter": adapter, "adapter_version": version, "group_id": group, "hint_round": hint_round,
            "prompt": prompt, "behaviour_logprobs": smp.logprobs,
            "completion": smp.text, "parsed": None if parsed is None else str(parsed), "verdict": None,
            "reward": None, "advantage": None, "prompt_tokens": len(smp.prompt_ids),
            "completion_tokens": len(smp.ids), "prompt_ids": smp.prompt_ids, "completion_ids": smp.ids}


async def certify_child(child: Task | None, parent: Task, max_edit: int, bounds: Difficulty) -> bool:
    """`child_is_valid` in a worker thread: the solver is pure Python (up to seconds for an
    unsolvable 6-number child), and in the event loop it would stall every episode in flight."""
    return await asyncio.to_thread(child_is_valid, child, parent, max_edit, bounds)


def build_graph(cfg: RunConfig, gen: Generator, prompts: Prompts, versions: dict[str, int],
                heldout: set[str] = frozenset()):
    """Compile the episode graph. `versions` is read live (adapter version per role, for the record)."""
    g, rw = cfg.graph, cfg.rewards
    pol = gen.policy
    student_cap, tutor_cap = cfg.generation.max_new_tokens, cfg.generation.tutor_max_new_tokens
    bounds = mutation_range(cfg.curriculum)

    def vars_of(t: Task) -> dict:
        return {"numbers": t.numbers, "target": t.target}

    async def ask(role: str, kind: str, n: int, cap: int, **vars) -> tuple[str, list[Sample]]:
        text = prompts.render(kind, **vars)
        return text, await gen.generate(role, pol.encode(text), n, cap)

    async def mutate(s: EpisodeState) -> dict:
        parent = s["task"]
        solve_bucket = min(9, int(10 * parent.extra.get("solve_rate", 0.0)))
        text, [smp] = await ask("tutor", "mutate", 1, tutor_cap, **vars_of(parent), solve_bucket=solve_bucket)
        child = TURNS["mutate"].parse(smp.text)
        valid = await certify_child(child, parent, g.mutate_max_edit, bounds) and child.key not in heldout
        turn = _turn(s, "tutor", "mutate", s["mutate_group"], smp, text, pol.adapters["tutor"],
                     versions["tutor"], child.key if child else None)
        turn["verdict"] = "valid" if valid else "invalid"
        if valid:
            child.id, child.parent, child.source = f"{s['episode_id']}/child", parent.id, "tutor"
        return {"current": child if valid else parent, "turns": s["turns"] + [turn]}

    async def attempt(s: EpisodeState) -> dict:
        t, r = s["current"], s["hint_round"]
        hints = s["hints"] if r > 0 else [None]
        n = g.group_size if r == 0 else g.hint_attempts
        asks = [ask("student", "attempt", n, student_cap, **vars_of(t), hint=h) for h in hints]
        new = []
        for j, (text, samples) in enumerate(await asyncio.gather(*asks)):
            group = f"{s['episode_id']}:a" if r == 0 else f"{s['episode_id']}:h{r}.{j}"
            new += [_turn(s, "student", "attempt", group, smp, text, pol.adapters["student"],
                          versions["student"], TURNS["attempt"].parse(smp.text), r) for smp in samples]
        return {"turns": s["turns"] + new}

    def verify_node(s: EpisodeState) -> dict:
        t, r = s["current"], s["hint_round"]
        turns, solved_round = [], False
        for turn in s["turns"]:
            if turn["kind"] == "attempt" and turn["verdict"] is None:
                v = verify(turn["parsed"] or "", t.numbers, t.target)
                turn = {**turn, "verdict": v.reason, "reward": TURNS["attempt"].reward(v, rw.format_credit)}
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
                turns[i] = {**x, "reward": TURNS["hint"].reward(x["parsed"] or "", t, rate, rw.hint_leak)}
        return out

    async def hint(s: EpisodeState) -> dict:
        t, r = s["current"], s["hint_round"] + 1
        failed = [x for x in s["turns"] if x["kind"] == "attempt" and x["verdict"] != "solved"]
        text, samples = await ask("tutor", "hint", g.hints_per_round, tutor_cap, **vars_of(t),
                                  attempt=failed[-1]["parsed"] or failed[-1]["completion"])
        new = [_turn(s, "tutor", "hint", f"{s['episode_id']}:H{r}", smp, text, pol.adapters["tutor"],
                     versions["tutor"], TURNS["hint"].parse(smp.text), r) for smp in samples]
        return {"turns": s["turns"] + new, "hint_round": r, "hints": [x["parsed"] for x in new]}

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
        new = []
        for k, (p, (text, samples)) in enumerate(zip(picks, await asyncio.gather(*asks))):
            truth = p["verdict"] == "solved"
            for smp in samples:
                pred = TURNS["judge"].parse(smp.text)
                turn = _turn(s, "tutor", "judge", f"{s['episode_id']}:J{k}", smp, text,
                             pol.adapters["tutor"], versions["tutor"], pred)
                turn["verdict"] = "correct" if truth else "incorrect"
                turn["reward"] = TURNS["judge"].reward(pred, truth)
                new.append(turn)
        return {"turns": s["turns"] + new}

    def start_route(s: EpisodeState) -> str:
        return "mutate" if s.get("mutate") and g.mutate else "attempt"

    def after_verify(s: EpisodeState) -> str:
        if not s["solved_round"] and g.hint and s["hint_round"] < g.hint_rounds:
            return "hint"
        return "judge" if g.judge and g.judge_attempts > 0 else END

    sg = StateGraph(EpisodeState)
    sg.add_node("mutate", mutate)
    sg.add_node("attempt", attempt)
    sg.add_node("verify", verify_node)
    sg.add_node("hint", hint)
    sg.add_node("judge", judge)
    sg.add_conditional_edges(START, start_route, ["mutate", "attempt"])
    sg.add_edge("mutate", "attempt")
    sg.add_edge("attempt", "verify")
    sg.add_conditional_edges("verify", after_verify, ["hint", "judge", END])
    sg.add_edge("hint", "attempt")
    sg.add_edge("judge", END)
    return sg.compile()


def episode_input(episode_id: str, iteration: int, task: Task, mutate_group: str | None) -> EpisodeState:
    return {"episode_id": episode_id, "iteration": iteration, "task": task, "current": task,
            "mutate": mutate_group is not None, "mutate_group": mutate_group or "", "hints": [],
            "hint_round": 0, "solved": False, "solved_round": False, "turns": []}


async def run_episodes(graph, inputs: list[EpisodeState], concurrency: int) -> list[EpisodeState]:
    return await graph.abatch(inputs, config={"max_concurrency": concurrency, "recursion_limit": 100})
