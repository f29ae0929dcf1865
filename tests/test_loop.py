"""End-to-end: a short real run learns, memory holds every iteration, kill -9 + resume loses nothing."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from memory.query import open_readonly, search, sql
from selfplay.loop import run
from selfplay.rundir import RunError
from tests.conftest import cli_sets, tiny_config

# An easy task set: targets are sums of two numbers, so "add them" solves every task; the test base
# samples it ~15% of the time. (Three numbers was too hard a start: on some machines' bases the run saw
# about one success per iteration and learned nothing in 60 iterations.)
EASY = {"curriculum.ops": "+", "eval.ops": "+", "curriculum.min_count": 2, "curriculum.max_count": 2,
        "eval.min_count": 2, "eval.max_count": 2, "eval.n_tasks": 48, "eval.samples": 4}


def test_short_plain_grpo_run_learns_the_easy_set(base_path, tmp_path):
    cfg = tiny_config(**EASY, **{"iterations": 60, "graph.hint": False, "graph.mutate": False, "graph.judge": False,
                                  "trainer.lr": 3e-3, "logging.checkpoint_every": 100})
    s = run(cfg, tmp_path / "run")
    # seeds are fixed and both evaluations use the same 48 tasks. Seen over seeds 0-3: greedy 0 of 48
    # before, 28-37 of 48 after; sampled (192 samples) 0.13-0.16 before, 0.24-0.39 after. The bars:
    # greedy +12 of 48 (3.5 SE of a paired binary difference), sampled +0.05 (the smallest seen, +0.08,
    # was 2.4 SE; the bar is far below every seed's gain, and no gain at all fails it).
    b, a = s["before"], s["after"]
    assert a["greedy_solve_rate"] >= b["greedy_solve_rate"] + 0.25, (b["greedy_solve_rate"], a["greedy_solve_rate"])
    assert s["improvement"]["delta"] >= 0.05, (b["solve_rate"], a["solve_rate"])
    db = open_readonly(tmp_path / "run" / "memory.db")
    _, [[n]] = sql(db, "select count(*) from episodes")
    assert n == 60 * cfg.curriculum.episodes_per_iter
    assert (tmp_path / "run" / "learning_curves.png").is_file()
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert "hint_collapse" not in s  # no tutor, no collapse to look for


def test_full_tutor_iteration_writes_memory(base_path, tmp_path):
    from selfplay.rundir import _held

    cfg = tiny_config(**{"iterations": 2, "graph.hint_rounds": 1, "eval.n_tasks": 8})
    assert cfg.graph.hint_source == "tutor" and cfg.trainer.train_tutor
    s = run(cfg, tmp_path / "run")
    assert s["hint_collapse"] is None  # two iterations: far too short to collapse
    assert (tmp_path / "run").resolve() not in _held  # a finished run releases its dir's lock
    db = open_readonly(tmp_path / "run" / "memory.db")
    cols, rows = sql(db, "select kind, count(*) from turns group by kind")
    kinds = dict(rows)
    assert {"attempt", "judge"} <= set(kinds)
    _, [[episodes]] = sql(db, "select count(*) from episodes")
    _, [[groups]] = sql(db, "select count(distinct episode_id) from turns")
    assert episodes == 2 * cfg.curriculum.episodes_per_iter == groups
    _, [[missing]] = sql(db, "select count(*) from turns where reward is null or advantage is null")
    assert missing == 0
    # every hint is findable by a word (here: a number) in its text
    hints = list(sql(db, "select id, completion from turns where kind = 'hint' and completion != '' limit 1")[1])
    if hints:
        word = "".join(ch if ch.isdigit() else " " for ch in hints[0][1]).split()[0]
        assert any(r["id"] == hints[0][0] for r in search(db, word, limit=1000))
    with pytest.raises(sqlite3.DatabaseError, match="readonly|not authorized"):
        sql(db, "delete from episodes")
    _, [[still]] = sql(db, "select count(*) from episodes")
    assert still == episodes


def test_existing_run_dir_is_refused_without_resume(base_path, tmp_path):
    cfg = tiny_config(**{"iterations": 1, "eval.n_tasks": 4, "eval.judge_attempts": 0})
    run(cfg, tmp_path / "run")
    with pytest.raises(RunError, match="--resume"):
        run(cfg, tmp_path / "run")


def _episodes(db_path):
    if not db_path.is_file():
        return (0, 0, 0)
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return con.execute("select count(*), count(distinct id), coalesce(max(iteration), 0) from episodes").fetchone()
    except sqlite3.OperationalError:
        return (0, 0, 0)
    finally:
        con.close()


def test_a_run_dir_in_use_is_refused_with_one_line(tmp_path):
    from selfplay.rundir import lock_run_dir, prepare_dir, unlock_run_dir

    out = tmp_path / "run"
    prepare_dir(out, tiny_config(), resume=False)  # a run dir, as a starting run leaves it
    lock_run_dir(out)  # this process holds it, as a running `selfplay run` does
    try:
        for args in (("--resume", out), ("--out", out)):
            r = subprocess.run([sys.executable, "-m", "selfplay.cli", "run", *map(str, args), "--quiet"],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 2 and f"in use by another selfplay process (pid {os.getpid()})" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr and not (out / "memory.db").exists()
    finally:
        unlock_run_dir(out)
    lock_run_dir(out)  # released: free again (kill -9 releases it too: the test below resumes after one)
    unlock_run_dir(out)


def test_a_run_that_raises_in_process_frees_its_dir_and_stops_its_learner(base_path, tmp_path, monkeypatch):
    # A notebook that catches a run's error lives on: the run must not keep its dir's lock (a resume in the
    # same notebook, or any other process, was refused until the kernel exited), its learner process, or
    # its store open. The error is injected at iteration 2 (a stand-in for any failure mid-run).
    import fcntl
    import multiprocessing

    from selfplay.loop import SelfPlay
    from selfplay.rundir import _held

    real = SelfPlay.iteration

    def iteration(self, it):
        if it == 2:
            raise RuntimeError("injected")
        return real(self, it)

    monkeypatch.setattr(SelfPlay, "iteration", iteration)
    cfg = tiny_config(**{"iterations": 3, "trainer.policy_lag": 1, "eval.n_tasks": 4, "eval.judge_attempts": 0})
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected"):
        run(cfg, out)
    assert out.resolve() not in _held and not multiprocessing.active_children()
    with open(out / ".lock") as fh:  # a second open file's flock fails while any other holds it
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    monkeypatch.setattr(SelfPlay, "iteration", real)
    s = run(None, out, resume=True)  # iteration 1 was stored; the resume replays from the last checkpoint
    assert s["iterations"] == 3 and _episodes(out / "memory.db") == (24, 24, 3)


def test_kill_9_then_resume_loses_and_duplicates_nothing(base_path, tmp_path):
    out = tmp_path / "run"
    sets = cli_sets(**{"iterations": 8, "logging.checkpoint_every": 3, "eval.n_tasks": 4, "eval.samples": 1,
                       "eval.judge_attempts": 0, "curriculum.episodes_per_iter": 4})
    cmd = [sys.executable, "-m", "selfplay.cli", "run", "--out", str(out), "--quiet", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and _episodes(out / "memory.db")[2] < 5:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    n, distinct, last = _episodes(out / "memory.db")
    assert 5 <= last < 8, "the run should have been killed mid-way"
    r = subprocess.run([sys.executable, "-m", "selfplay.cli", "run", "--resume", str(out), "--quiet"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    n, distinct, last = _episodes(out / "memory.db")
    assert last == 8 and n == distinct == 8 * 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 8
    # the resumed trainer's adapter versions reach the episode records (they stayed 0 after a resume)
    con = sqlite3.connect(f"file:{out / 'memory.db'}?mode=ro", uri=True)
    [(v,)] = con.execute("select max(adapter_version) from turns where role = 'student' and iteration = 8").fetchall()
    con.close()
    assert v >= 6  # checkpoint at 6 (or 3) + one update per iteration, unless a batch had no signal
    # every iteration and the "before" evaluation are logged exactly once (replays used to repeat)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r["iteration"] for r in rows if "student/solve_rate" in r]
    assert trained == list(range(1, 9)), trained
    assert sum(r.get("eval/tag") == 0 for r in rows) == 1


def test_judge_paid_run_logs_proxy_and_truth_every_iteration(base_path, tmp_path):
    # the check: `selfplay run --set rewards.student_source=judge` carries both the proxy and
    # the truth for every iteration, in metrics.jsonl, TensorBoard and the store
    cfg = tiny_config(**{"iterations": 3, "rewards.student_source": "judge", "graph.hint": False,
                         "graph.judge_votes": 3, "eval.n_tasks": 8, "eval.judge_attempts": 8})
    s = run(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "student/solve_rate" in r]
    assert [r["iteration"] for r in train] == [1, 2, 3]
    assert all("student/judge_reward" in r and "student/true_solve_rate" in r for r in train)
    assert "goodhart" in s and s["goodhart"]["iteration"] is None  # 3 iterations: too short to part
    for k in ("judge_balanced_accuracy", "judge_precision", "judge_recall"):
        assert k in s["after"]
    # both classes: 4 solver answers (right) + 4 sampled attempts (labelled by the verifier)
    assert s["after"]["judge_positives"] >= 4 and s["after"]["judge_positives"] + s["after"]["judge_negatives"] == 8
    db = open_readonly(tmp_path / "run" / "memory.db")
    _, [[judged, proxy_hits]] = sql(db, "select count(judge), sum(reward) from turns where kind = 'attempt'")
    _, [[n_att]] = sql(db, "select count(*) from turns where kind = 'attempt'")
    assert judged == n_att > 0
    _, [[names]] = sql(db, "select count(distinct name) from metrics where name in ('student/judge_reward', 'student/true_solve_rate')")
    assert names == 2


def test_parting_iteration_by_hand():
    from selfplay.metrics import parting_iteration

    # window 3, margin 0.12. truth flat at 0.05; the proxy is 0.1 for iterations 1-5, then climbs.
    # gap = proxy - 0.05: [.05]*5 + [.15, .25, .35, .45, .55] + [.55]*5 (iterations 1..15); the
    # baseline is the mean gap of iterations 1-3 = .05. Above .05 + .12 = .17: iterations 7 (.25),
    # 8, 9, ... (6 is .15): three in a row by iteration 9 -> parted at iteration 7.
    its = list(range(1, 16))
    proxy = [0.1] * 5 + [0.2, 0.3, 0.4, 0.5, 0.6] + [0.6] * 5
    assert parting_iteration(its, proxy, [0.05] * 15, window=3, margin=0.12) == 7
    # a one-iteration spike is not a departure
    spike = [0.1] * 7 + [0.9] + [0.1] * 7
    assert parting_iteration(its, spike, [0.05] * 15, window=3, margin=0.12) is None
    # the proxy tracking a rising truth never parts
    rising = [0.05 * i for i in its]
    assert parting_iteration(its, rising, rising, window=3) is None



def test_hint_collapse_by_hand_and_warned_once_as_it_happens(tmp_path):
    import io

    from rich.console import Console

    from selfplay.config import build_config
    from selfplay.metrics import COLLAPSE_WINDOW, hint_collapse
    from selfplay.reporting import read_metrics
    from selfplay.reporting import RunLogger

    # window 3. Revealed shares of iterations 1..10; iteration 4 has no hints (no key), so it
    # neither breaks nor extends a streak. 2-3 are whole (>= 0.99) but 5 is 0.9: a streak of
    # 2 (2, 3; 4 skipped) broken at 5. Then 6, 7, 8 are whole: three in a row -> from iteration 6.
    revealed = {1: 0.7, 2: 1.0, 3: 0.995, 5: 0.9, 6: 1.0, 7: 0.99, 8: 1.0, 9: 1.0, 10: 0.5}
    rows = [{"iteration": i, **({"tutor/hint_revealed": revealed[i]} if i in revealed else {})} for i in range(1, 11)]
    assert hint_collapse(rows, window=3) == 6
    assert hint_collapse(rows, window=5) is None  # 6-9 is four
    assert hint_collapse([{"iteration": 1}]) is None  # no hints at all

    buf = io.StringIO()
    log = RunLogger(tmp_path, build_config({}, ["logging.tensorboard=false"]), Console(file=buf, width=400))
    for it in range(1, 2 * COLLAPSE_WINDOW + 2):  # one partial iteration, then whole solutions for two windows
        log.log(it, {"tutor/hint_revealed": 0.5 if it == 1 else 1.0})
    log.jsonl.close()
    assert buf.getvalue().count("whole solution") == 1  # once, not every iteration after
    assert f"iteration {COLLAPSE_WINDOW + 1}:" in buf.getvalue()  # iterations 2..51 make the window
    assert hint_collapse(read_metrics(tmp_path)) == 2

def _first_iteration_rows(out, role: str, **sets):
    """(the rows `role`'s update got, the metrics) of iteration 1 of a synchronous run without
    mutations or the judge, in the new run directory `out`."""
    from selfplay.loop import SelfPlay

    cfg = tiny_config(**{"graph.judge": False, "graph.mutate": False, "trainer.policy_lag": 0, **sets})
    out.mkdir()
    sp = SelfPlay(cfg, out)
    got, step = [], sp.trainer.step

    def capture(r, rows, cap):
        got.extend(rows if r == role else [])
        return step(r, rows, cap)

    sp.trainer.step = capture
    m = sp.iteration(1)
    sp.store.close()
    sp.close()
    return got, m


def test_hinted_pg_false_trains_hinted_attempts_by_their_hint_nll_only(base_path, tmp_path):
    # One iteration with and without the policy gradient on hinted continuations, from the same
    # seed (so the same episodes). Off, every row of a hinted attempt is a hint-only row: just the
    # forced tokens, advantage 0, NLL on (from a hinted attempt that solved); the rows of unhinted
    # attempts are the same either way.
    def student_rows(hinted_pg: bool):
        return _first_iteration_rows(tmp_path / f"pg{hinted_pg}", "student", **{
            "graph.hint_source": "schedule", "graph.schedule_start": 0.75, "trainer.train_tutor": False,
            "trainer.hinted_pg": hinted_pg, "curriculum.episodes_per_iter": 24})[0]

    def unhinted(rows):
        return [(r.prompt_ids, r.completion_ids, r.advantage) for r in rows if r.forced == 0]

    on, off = student_rows(True), student_rows(False)
    hinted_on = [r for r in on if r.forced > 0]
    hinted_off = [r for r in off if r.forced > 0]
    assert any(len(r.completion_ids) > r.forced for r in hinted_on)  # a PG row on a hinted continuation
    assert hinted_off and all(len(r.completion_ids) == r.forced and r.advantage == 0.0 and r.nll
                              for r in hinted_off)
    assert unhinted(on) == unhinted(off)


def test_tutor_kl_keeps_zero_variance_tutor_groups_as_kl_only_rows(base_path, tmp_path):
    # The same first iteration (same seed: same episodes) with and without the tutor's KL. Without
    # it, tutor turns of groups with equal rewards are dropped; with it they come as KL-only rows
    # (pg False, advantage 0), and every policy-gradient row is the same as without.
    def tutor_rows(kl: float):
        return _first_iteration_rows(tmp_path / f"kl{kl}", "tutor", **{
            "trainer.tutor_kl_coef": kl, "curriculum.episodes_per_iter": 16})

    def key(r):
        return r.prompt_ids, r.completion_ids, r.advantage

    (off, m_off), (on, m_on) = tutor_rows(0.0), tutor_rows(0.1)
    kl_only = [r for r in on if not r.pg]
    assert all(r.pg for r in off)
    assert kl_only and all(r.advantage == 0.0 for r in kl_only)
    assert [key(r) for r in on if r.pg] == [key(r) for r in off]
    assert "tutor/hint_empty" in m_on  # (the KL itself is 0 here: at step 0 the tutor is its prior)
    assert m_on["tokens/tutor_train"] > m_off["tokens/tutor_train"]  # their forward + backward is budgeted


def test_one_hint_per_failed_group_trains_the_tutor_only_with_the_batch_baseline(base_path, tmp_path):
    # One iteration, one hint per failed group, from the same seed (so the same episodes). With the
    # group baseline every hint is a singleton group: no tutor row. With the batch baseline all the
    # iteration's hints are one group, so every hint is trained, with its batch-normalised reward.
    def tutor_rows(baseline: str):
        return _first_iteration_rows(tmp_path / baseline, "tutor", **{
            "graph.hints_per_round": 1, "trainer.hint_baseline": baseline, "curriculum.episodes_per_iter": 16})

    (group, _), (batch, m) = tutor_rows("group"), tutor_rows("batch")
    assert group == []
    assert len(batch) >= 2 and len({r.advantage for r in batch}) > 1
    assert sum(r.advantage for r in batch) == pytest.approx(0.0, abs=1e-6)  # centred on the batch mean
    assert "tutor/hint_groups_identical" not in m  # no group of two hints to compare


def test_batch_hint_baseline_by_hand():
    # Hints of three failed groups (one each) with rewards 0.75, 0 and 0.5 and a student group of two.
    # Batch baseline: the hints are one group: mean 5/12, unbiased std sqrt(((1/3)² + (5/12)² +
    # (1/12)²) / 2) = sqrt(0.1458) = 0.3819 -> A = [0.8729, -1.0911, 0.2182]; the student group is
    # its own: [1, 0] -> A = [0.7071, -0.7071]. Group baseline: three singletons, none kept.
    from selfplay.grpo import group_advantages
    from selfplay.loop import advantage_group

    turns = [{"role": "tutor", "kind": "hint", "group_id": f"{e}:H1"} for e in "abc"]
    turns += [{"role": "student", "kind": "attempt", "group_id": "a:a"}] * 2
    rewards = [0.75, 0.0, 0.5, 1.0, 0.0]
    adv, keep = group_advantages(rewards, [advantage_group(t, "batch") for t in turns])
    assert adv == pytest.approx([0.8729, -1.0911, 0.2182, 0.7071, -0.7071], abs=1e-4) and all(keep)
    _, keep = group_advantages(rewards, [advantage_group(t, "group") for t in turns])
    assert keep == [False] * 3 + [True] * 2


def test_hint_metrics_by_hand():
    # three hint groups: H1 = two identical answers "4" (revealed 0.5), H2 = "4" and "6" (0.5, 0.75),
    # H3 = two empty answers (revealed 0). Identical groups: H1 and H3 = 2/3; empty hints 2/6;
    # mean revealed (0.5 + 0.5 + 0.5 + 0.75 + 0 + 0) / 6 = 0.375
    from selfplay.metrics import turn_metrics

    def hint(group, completion, revealed):
        return {"kind": "hint", "role": "tutor", "group_id": group, "completion": completion,
                "revealed": revealed, "reward": 0.0}

    turns = [hint("e:H1", "4", 0.5), hint("e:H1", "4", 0.5), hint("f:H1", "4", 0.5), hint("f:H1", "6", 0.75),
             hint("g:H1", "", 0.0), hint("g:H1", "", 0.0)]
    m = turn_metrics(turns)
    assert m["tutor/hint_groups_identical"] == pytest.approx(2 / 3)
    assert m["tutor/hint_empty"] == pytest.approx(2 / 6)
    assert m["tutor/hint_revealed"] == pytest.approx(0.375)
