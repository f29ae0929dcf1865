"""The episode graph with the real tiny model: routing, budgets, rewards and fused batches."""

import asyncio
import re
import sqlite3

import pytest

from selfplay.domains.countdown import Task, generate_tasks
from selfplay.generator import Generator, TorchBackend
from selfplay.graph import build_graph, episode_input, run_episodes
from selfplay.prompts import Prompts
from tests.conftest import tiny_config


def _run(policy, cfg, tasks, mutate_every=0, heldout=frozenset()):
    gen = Generator(policy, TorchBackend(policy, 1.0, 0, seed=0), max_batch=4096)
    graph = build_graph(cfg, gen, Prompts(cfg.prompts), {"student": 0, "tutor": 0}, heldout)
    inputs = [episode_input(f"1.{k}", 1, t, f"m{k // 2}" if mutate_every and k % mutate_every == 0 else None)
              for k, t in enumerate(tasks)]
    return gen, asyncio.run(run_episodes(graph, inputs, concurrency=64))


def test_routing_solved_hint_and_judge(policy):
    cfg = tiny_config(**{"graph.hint_rounds": 2, "graph.judge_votes": 2, "graph.group_size": 4})
    tasks = generate_tasks(24, 11) + [Task([1, 1], 2, id="easy"), Task([2, 3], 5, id="easy2")]
    _, states = _run(policy, cfg, tasks)
    seen = set()
    for s in states:
        kinds = [t["kind"] for t in s["turns"]]
        unhinted = [t for t in s["turns"] if t["kind"] == "attempt" and t["hint_round"] == 0]
        assert len(unhinted) == 4 and all(t["reward"] is not None for t in s["turns"])
        if any(t["verdict"] == "solved" for t in unhinted):
            seen.add("solved")
            assert "hint" not in kinds and s["hint_round"] == 0
        else:
            seen.add("hinted")
            rounds = s["hint_round"]
            assert 1 <= rounds <= 2  # the router stops at the budget
            assert kinds.count("hint") == 2 * rounds  # hints_per_round = 2
            assert kinds.count("attempt") == 4 + 2 * 4 * rounds  # G + H * hint_attempts per round
            if rounds == 2:
                seen.add("budget")
                round1 = [t for t in s["turns"] if ":h1." in t["group_id"]]
                assert not any(t["verdict"] == "solved" for t in round1)  # a second round only after a failed first
            for h in (t for t in s["turns"] if t["kind"] == "hint"):
                assert 0.0 <= h["reward"] <= 1.0 and 0 <= h["revealed"]  # s (1 - 0.5 f), s and f in [0, 1]
            for a in (t for t in s["turns"] if t["kind"] == "attempt" and t["hint_round"] > 0):
                # the hint is the start of the completion (teacher-forced), not prompt text
                assert "H:" not in a["prompt"] and a["completion"].startswith(a["hint"])
                assert a["completion_ids"][: a["forced"]] == policy.tokenizer(a["hint"], add_special_tokens=False)["input_ids"]
        judges = [t for t in s["turns"] if t["kind"] == "judge"]
        assert len(judges) == 2
        for t in judges:  # 1 only when a parsed verdict agrees with the verifier
            agree = t["parsed"] is not None and (t["parsed"] == "True") == (t["verdict"] == "correct")
            assert t["reward"] == float(agree)
        seen.add("judge")
    assert {"solved", "hinted", "budget", "judge"} <= seen


def test_judge_paid_student_gets_the_majority_verdict_and_keeps_the_truth(policy):
    # rewards.student_source=judge: every attempt gets k = 3 votes; reward 1 iff more than 1.5 say Y.
    cfg = tiny_config(**{"rewards.student_source": "judge", "graph.judge_votes": 3, "graph.group_size": 4,
                         "graph.hint": False})
    tasks = generate_tasks(12, 5) + [Task([1, 1], 2, id="easy"), Task([2, 3], 5, id="easy2")]
    _, states = _run(policy, cfg, tasks)
    n_attempts = 0
    for s in states:
        attempts = [t for t in s["turns"] if t["kind"] == "attempt"]
        judges = [t for t in s["turns"] if t["kind"] == "judge"]
        assert len(attempts) == 4 and len(judges) == 3 * 4  # the votes follow the attempts' order
        assert {t["group_id"] for t in judges} == {f"{s['episode_id']}:P0"}  # one group: the round's votes
        for k, a in enumerate(attempts):
            n_attempts += 1
            votes = judges[3 * k: 3 * k + 3]
            assert all(a["parsed"] and a["parsed"] in v["prompt"] for v in votes if a["parsed"])
            yes = sum(v["parsed"] == "True" for v in votes)
            assert a["judge"] == pytest.approx(yes / 3) and a["reward"] == (1.0 if yes >= 2 else 0.0)
            truth = a["verdict"] == "solved"
            for v in votes:  # each vote is paid for agreeing with the verifier, not with the majority
                assert v["verdict"] == ("correct" if truth else "incorrect")
                assert v["reward"] == float(v["parsed"] is not None and (v["parsed"] == "True") == truth)
    assert n_attempts == 4 * len(tasks)


def _run_at(policy, cfg, tasks, progress):
    gen = Generator(policy, TorchBackend(policy, 1.0, 0, seed=0), max_batch=4096)
    graph = build_graph(cfg, gen, Prompts(cfg.prompts), {"student": 0, "tutor": 0})
    inputs = [episode_input(f"1.{k}", 1, t, None, progress) for k, t in enumerate(tasks)]
    return asyncio.run(run_episodes(graph, inputs, concurrency=64))


def test_schedule_and_solution_hints_come_from_the_solver(policy):
    from selfplay.domains.countdown import solve
    from selfplay.graph import schedule_share

    # the cosine schedule by hand: 0.75 at the start, 0.75 * (1 + cos(pi/2)) / 2 = 0.375 halfway to
    # the end (0.35 of a run ending the schedule at 0.7), 0 from the end on
    assert schedule_share(0.0, 0.75, 0.7) == 0.75 and abs(schedule_share(0.35, 0.75, 0.7) - 0.375) < 1e-12
    assert schedule_share(0.7, 0.75, 0.7) == 0.0
    tasks = generate_tasks(6, 21)  # reachable by construction; the base fails most with 2 attempts
    sets = {"graph.judge": False, "graph.group_size": 2, "graph.hint_attempts": 2}
    for state in _run_at(policy, tiny_config(**sets, **{"graph.hint_source": "schedule"}), tasks, 0.0):
        hinted = [t for t in state["turns"] if t["hint_round"] == 1]
        if state["solved"]:
            continue
        sol = policy.tokenizer(solve(state["current"].numbers, state["current"].target).expr,
                               add_special_tokens=False)["input_ids"]
        assert hinted and all(t["completion_ids"][: t["forced"]] == sol[: int(0.75 * len(sol))] for t in hinted)
        assert not [t for t in state["turns"] if t["kind"] == "hint"]  # no tutor turn: the environment hinted
    for state in _run_at(policy, tiny_config(**sets, **{"graph.hint_source": "schedule"}), tasks, 0.9):
        assert state["hint_round"] <= 1 and not [t for t in state["turns"] if t["hint_round"] == 1]  # share 0: no hint
    for state in _run_at(policy, tiny_config(**sets, **{"graph.hint_source": "solution"}), tasks, 0.0):
        for t in (t for t in state["turns"] if t["hint_round"] == 1):
            assert t["hint"] == solve(state["current"].numbers, state["current"].target).expr
            assert t["verdict"] == "solved" or t["completion"] != t["hint"]  # only extra tokens can fail it


def test_nearest_hints_continue_a_failed_attempt(policy):
    from selfplay.domains.countdown import nearest_solution, solve

    tasks = generate_tasks(16, 23)
    sets = {"graph.judge": False, "graph.group_size": 4, "graph.hint_attempts": 2, "graph.hint_source": "solution",
            "graph.hint_solution": "nearest"}
    near_seen = 0
    for state in _run_at(policy, tiny_config(**sets), tasks, 0.0):
        if state["solved"]:
            continue
        t = state["current"]
        failed = [x["parsed"] or x["completion"] for x in state["turns"] if x["kind"] == "attempt" and x["hint_round"] == 0]
        near = nearest_solution(t.numbers, t.target, failed)
        want = near[0] if near else solve(t.numbers, t.target).expr  # the solver's when none is near
        hinted = [x for x in state["turns"] if x["hint_round"] == 1]
        assert hinted and all(x["hint"] == want for x in hinted)
        if near:  # it starts like one of the failed attempts (at least with its first number)
            near_seen += 1
            assert re.findall(r"\d+|\S", failed[near[1]])[0] == re.findall(r"\d+|\S", want)[0]
    assert near_seen >= 3


def test_mutation_rewards_and_fallback(policy):
    cfg = tiny_config(**{"graph.hint": False, "graph.judge": False})
    tasks = generate_tasks(8, 12)
    _, states = _run(policy, cfg, tasks, mutate_every=1)
    for s in states:
        [m] = [t for t in s["turns"] if t["kind"] == "mutate"]
        if m["verdict"] == "valid":
            assert s["current"].parent == s["task"].id and s["current"].key != s["task"].key
            assert m["reward"] == -0.5 or 0 < m["reward"] < 1
        else:
            assert s["current"] is s["task"] or s["current"].key == s["task"].key  # the student plays the parent
            assert m["reward"] == -1.0


def test_concurrent_episodes_fuse_into_large_batches(policy):
    cfg = tiny_config(**{"graph.hint": False, "graph.judge": False, "graph.group_size": 4})
    gen, states = _run(policy, cfg, generate_tasks(64, 13))
    assert len(states) == 64
    assert gen.batch_sizes[0] == 64 * 4  # all 64 episodes' attempts in ONE forward, not 64 batches
    assert len(gen.batch_sizes) == 1


def test_bad_template_is_a_one_line_startup_error(tmp_path):
    from selfplay.config import ConfigError

    (tmp_path / "attempt.j2").write_text("S:{{ numbrs }}")
    for name in ("hint_step.j2", "mutate_edit.j2", "judge.j2"):
        (tmp_path / name).write_text("x")
    with pytest.raises(ConfigError, match="prompts.attempt"):
        Prompts(tiny_config(**{"prompts.dir": str(tmp_path)}).prompts)
    with pytest.raises(ConfigError, match="template not found"):
        Prompts(tiny_config(**{"prompts.hint": "nope.j2"}).prompts)


def test_same_seed_same_episodes(base_path, tmp_path):
    # Two runs with one seed must store the same episodes, token for token. They did not: LangGraph
    # runs a sync route in a worker thread and the solver ran in one too, so a thread's finishing time
    # decided which fused batch an episode's next call joined, and with it which samples it drew
    # (two 20-iteration runs parted at iteration 3). Every node and route now runs on the loop's thread.
    from selfplay.loop import run

    cfg = tiny_config(**{"iterations": 4, "graph.mutate": True,
                         "eval.n_tasks": 4, "eval.samples": 1, "logging.checkpoint_every": 100})
    stored = []
    for k in range(2):
        run(cfg, tmp_path / f"run{k}", quiet=True)
        db = sqlite3.connect(tmp_path / f"run{k}" / "memory.db")
        stored.append(db.execute("select kind, prompt, completion, reward, advantage from turns order by id").fetchall())
    kinds = {row[0] for row in stored[0]}
    assert {"attempt", "hint", "mutate"} <= kinds, kinds
    assert stored[0] == stored[1]


def test_hindsight_relabels_failed_attempts_as_solved_tasks(policy):
    # A failed attempt reaching a whole value v in 1..max_target (not the plain sum, not held out)
    # carries the prompt of the task it did solve; anything else carries none.
    from selfplay.domains.countdown import verify
    from selfplay.loop import hindsight_rows

    cfg = tiny_config(**{"graph.hint": False, "graph.judge": False, "trainer.hindsight_nll": 1.0})
    tasks = generate_tasks(64, 5)
    _, states = _run(policy, cfg, tasks)
    relabelled, keys = 0, set()
    for s in states:
        t = s["current"]
        for a in (x for x in s["turns"] if x["kind"] == "attempt"):
            v = verify(a["parsed"] or "", t.numbers, t.target)
            ok = (v.reason == "wrong_value" and v.value.denominator == 1 and 1 <= v.value <= 100
                  and v.value != sum(t.numbers))
            assert bool(a.get("hindsight_ids")) == ok, (a["parsed"], t)
            if ok:
                relabelled += 1
                keys.add(Task(t.numbers, int(v.value)).key)
                prompt = policy.decode(a["hindsight_ids"])
                assert prompt == f"S:{' '.join(map(str, t.numbers))}>{v.value}|"
                assert verify(a["parsed"], t.numbers, int(v.value)).solved  # the relabelled task is solved
    assert relabelled >= 3  # (9 of 512 attempts on this machine's test base: the test must see some)
    turns = [a for s in states for a in s["turns"]]
    rows = hindsight_rows(turns + turns)  # a repeated (prompt, completion) is one row
    assert len(rows) == len({(tuple(a["hindsight_ids"]), tuple(a["completion_ids"])) for a in turns
                             if a.get("hindsight_ids")})
    for row, _ in rows:  # every completion token is NLL-trained, none gets a policy gradient
        assert row.hindsight and row.forced == len(row.completion_ids) and row.advantage == 0.0
    # a relabelled task that is held out is never trained on: the same seed draws the same attempts,
    # and with every task they reached held out, none is relabelled
    _, again = _run(policy, cfg, tasks, heldout=keys)
    assert [a["completion_ids"] for s in again for a in s["turns"]] == [a["completion_ids"] for a in turns]
    assert not any(a.get("hindsight_ids") for s in again for a in s["turns"])


def test_hindsight_numbers_relabels_answers_that_used_other_numbers(policy):
    # With trainer.hindsight_numbers an answer that used other numbers than the task's (e.g. 25+25-7
    # on 3 7 25) is relabelled as the task of the numbers it used, in a shuffled order, with target
    # its value (43), when that is a fresh task (3-4 numbers in 1..25, a whole target in 1..100, not
    # their plain sum); wrong-value relabels are unchanged, and the same seed draws the same attempts.
    import re

    from selfplay.domains.countdown import verify

    cfg = {"graph.hint": False, "graph.judge": False, "trainer.hindsight_nll": 1.0}
    tasks = generate_tasks(64, 5)
    _, off = _run(policy, tiny_config(**cfg), tasks)
    _, on = _run(policy, tiny_config(**cfg, **{"trainer.hindsight_numbers": True}), tasks)
    extra, shuffled = 0, 0
    for s_off, s_on in zip(off, on):
        t = s_on["current"]
        for a, b in zip(s_off["turns"], s_on["turns"]):
            assert a["completion_ids"] == b["completion_ids"]
            v = verify(b["parsed"] or "", t.numbers, t.target)
            used = [int(x) for x in re.findall(r"\d+", b["parsed"] or "")]
            ok = (v.reason == "bad_numbers" and v.value is not None and v.value.denominator == 1
                  and 1 <= v.value <= 100 and v.value != sum(used) and 3 <= len(used) <= 4
                  and all(1 <= x <= 25 for x in used))
            if v.reason != "bad_numbers":
                assert b.get("hindsight_ids") == a.get("hindsight_ids")
                continue
            assert not a.get("hindsight_ids") and bool(b.get("hindsight_ids")) == ok, (b["parsed"], t)
            if ok:
                extra += 1
                nums, target = policy.decode(b["hindsight_ids"]).removeprefix("S:").rstrip("|").split(">")
                nums = [int(x) for x in nums.split()]
                assert sorted(nums) == sorted(used) and int(target) == v.value
                assert verify(b["parsed"], nums, int(target)).solved  # the relabelled task is solved
                shuffled += nums != used
    assert extra >= 3, extra  # (the test must see some)
    assert shuffled >= 1  # the prompt does not list the numbers in the answer's order every time


def _hindsight_pair(policy, schedule_start: float, flags: dict):
    """Episodes of 32 tasks with schedule hints and hindsight, without and with `flags` (one seed)."""
    cfg = {"graph.judge": False, "graph.hint_source": "schedule", "graph.schedule_start": schedule_start,
           "trainer.hindsight_nll": 1.0}
    tasks = generate_tasks(32, 7)
    return _run(policy, tiny_config(**cfg), tasks)[1], _run(policy, tiny_config(**cfg, **flags), tasks)[1]


def test_hindsight_solved_hinted_trains_hinted_solutions_under_the_plain_prompt(policy):
    # Rationalization: a hinted attempt that solved gets the plain task prompt as its hindsight
    # prompt (the same ids its unhinted group was asked with), so the row teaches the whole solution,
    # revealed tokens included, without the hint. The same seed draws the same attempts either way.
    from selfplay.loop import hindsight_rows

    off, on = _hindsight_pair(policy, 0.9, {"trainer.hindsight_solved_hinted": True})
    n = 0
    for a_state, b_state in zip(off, on):
        plain = next(a for a in b_state["turns"] if a["kind"] == "attempt" and a["hint_round"] == 0)
        for a, b in zip(a_state["turns"], b_state["turns"]):
            assert a["completion_ids"] == b["completion_ids"]
            if b["kind"] == "attempt" and b["hint_round"] > 0 and b["verdict"] == "solved":
                n += 1
                assert not a.get("hindsight_ids") and b["hindsight_ids"] == plain["prompt_ids"]
                assert b["forced"] > 0 and b["prompt_ids"] == plain["prompt_ids"]  # the hint is in the completion
            else:
                assert a.get("hindsight_ids") == b.get("hindsight_ids")
    assert n >= 1
    rows = [r for r, _ in hindsight_rows([a for s in on for a in s["turns"]])]
    solved = [a for s in on for a in s["turns"] if a.get("verdict") == "solved" and a["hint_round"] > 0]
    assert any(r.prompt_ids == a["prompt_ids"] and r.completion_ids == a["completion_ids"] for r in rows for a in solved)


def test_hindsight_hinted_false_relabels_unhinted_attempts_only(policy):
    # The same seed draws the same attempts with either setting; only hinted attempts (whose
    # completion starts with the solver's revealed tokens) lose their relabelled prompt.
    on, off = _hindsight_pair(policy, 0.5, {"trainer.hindsight_hinted": False})
    turns_on = [a for s in on for a in s["turns"] if a["kind"] == "attempt"]
    turns_off = [a for s in off for a in s["turns"] if a["kind"] == "attempt"]
    assert [a["completion_ids"] for a in turns_on] == [a["completion_ids"] for a in turns_off]
    hinted = [(a, b) for a, b in zip(turns_on, turns_off) if a["hint_round"] > 0]
    assert sum(bool(a.get("hindsight_ids")) for a, _ in hinted) >= 1  # relabelled when allowed
    assert not any(b.get("hindsight_ids") for _, b in hinted)
    assert all(a.get("hindsight_ids") == b.get("hindsight_ids") for a, b in zip(turns_on, turns_off)
               if a["hint_round"] == 0)
