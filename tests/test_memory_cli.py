"""The `selfplay` CLI over a finished run: one-line errors, read-only SQL, search, show, export."""

import json
import subprocess
import sys

import pytest

from tests.conftest import cli_sets


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "selfplay.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, base_path):
    out = tmp_path_factory.mktemp("cli") / "run"
    sets = cli_sets(**{"iterations": 2, "eval.n_tasks": 6, "eval.samples": 1, "eval.judge_attempts": 2,
                       "curriculum.episodes_per_iter": 4, "logging.log_every": 1})
    r = cli("run", "--out", out, *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    # stderr is a pipe here, so no progress bar: one plain line per iteration instead
    lines = [x for x in r.stderr.splitlines() if x.startswith("iter ")]
    assert [x.split(" | ")[0] for x in lines] == ["iter 1/2", "iter 2/2"], r.stderr[-2000:]
    assert "student/solve_rate" in lines[0] and "time/samples_per_s" in lines[0]
    return out


def test_store_accumulates_a_replayed_tasks_counts_and_rewrites_an_iterations_metrics(tmp_path):
    from memory.query import open_readonly, search
    from memory.store import EpisodeStore

    store = EpisodeStore(tmp_path / "memory.db")
    fields = ("episode_id", "iteration", "role", "kind", "adapter", "adapter_version", "group_id", "hint_round", "hint",
              "prompt", "completion", "parsed", "verdict", "reward", "advantage", "prompt_tokens", "completion_tokens", "judge")

    def write(it, task_id, attempts, solved, value):
        task = {"id": task_id, "key": task_id, "numbers": "[1, 2]", "target": 3, "parent": None, "source": "fresh",
                "first_iteration": it, "attempts": attempts, "solved": solved}
        ep = {"id": f"{it}.{task_id}", "iteration": it, "task_id": task_id, "parent_task_id": None, "mutated": 0, "solved": 1,
              "hint_rounds": 0, "n_turns": 300}
        turns = [dict(zip(fields, (f"{it}.{task_id}", it, "student", "attempt", "student", it, "g", 0, None, f"reach 3 #{k}",
                                    f"1+2 zebra{it}", "3", "solved", 1.0, 0.5, 4, 3, None))) for k in range(300)]
        store.write_iteration(it, [task], [ep], turns, {"student/solve_rate": value})

    write(1, "t", 8, 2, 0.25)
    write(2, "t", 8, 3, 0.5)  # the same task replayed: its counts add up (8 + 8, 2 + 3)
    write(2, "u", 8, 0, 0.75)  # iteration 2's metrics written again: replaced, not duplicated
    store.close()
    db = open_readonly(tmp_path / "memory.db")
    assert db.execute("select attempts, solved from tasks where id = 't'").fetchone() == (16, 5)
    assert db.execute("select value from metrics where iteration = 2").fetchall() == [(0.75,)]
    assert db.execute("select count(*) from turns").fetchone() == (900,)  # 300 turns: two chunks of 250 and 50
    assert len(search(db, "zebra1", limit=1000)) == 300  # the full-text index follows the inserts


def _store_of(path, iterations: int, replay: str | None = None):
    """A store of `iterations` iterations of 10 fresh tasks, one episode each of 4 unhinted attempts
    (1 solved); the last iteration also replays task `replay` (4 more attempts, all solved)."""
    from memory.store import EpisodeStore

    store = EpisodeStore(path)
    for it in range(1, iterations + 1):
        ids = [f"t{it}.{k}" for k in range(10)]
        again = [replay] if replay and it == iterations else []  # all 4 attempts solved
        tasks = [{"id": i, "key": i, "numbers": "[1, 2]", "target": 3, "parent": None, "source": "fresh",
                  "first_iteration": it, "attempts": 4, "solved": 4 if i in again else 1} for i in ids + again]
        ids += again
        eps = [{"id": f"e{it}.{i}", "iteration": it, "task_id": i, "parent_task_id": None, "mutated": 0, "solved": 1,
                "hint_rounds": 0, "n_turns": 4} for i in ids]
        turns = [{"episode_id": f"e{it}.{i}", "iteration": it, "role": "student", "kind": "attempt", "hint_round": 0,
                  "verdict": "solved" if i in again or j == 0 else "wrong_value", "prompt": "p", "completion": "c"}
                 for i in ids for j in range(4)]
        store.write_iteration(it, tasks, eps, turns, {"student/solve_rate": 0.25})
    return store


def test_truncate_after_restores_a_replayed_tasks_counts_in_work_that_does_not_grow_with_the_run(tmp_path):
    # a resume drops what was written after the checkpoint. Task t1.0 (iteration 1: 4 attempts, 1 solved)
    # was replayed in the dropped iteration (+4, +4): its counts go back to (4, 1); the dropped iteration's
    # own tasks are gone. The work must not grow with the run's length: the recount once scanned every
    # episode for every task (a 16x run's resume spent over 10 minutes in it). SQLite's VM steps, counted
    # by its progress handler, for a run of 10 and of 100 iterations: that recount grew 120x (7,591 ->
    # 911,928 handler calls); recounting the dropped iteration's 11 tasks grows 3x (29 -> 91: the one
    # linear scan left, of tasks by first_iteration, costs milliseconds at a 16x run's 43k tasks).
    steps = {}
    for n in (10, 100):
        store = _store_of(tmp_path / f"m{n}.db", n, replay="t1.0")
        count = [0]
        store.db.conn.set_progress_handler(lambda: count.__setitem__(0, count[0] + 1) or 0, 100)
        store.truncate_after(n - 1)
        store.db.conn.set_progress_handler(None, 100)
        steps[n] = count[0]
        db = store.db
        assert db.execute("select attempts, solved from tasks where id = 't1.0'").fetchone() == (4, 1)
        assert db.execute("select count(*) from tasks").fetchone() == (10 * (n - 1),)
        assert db.execute("select max(iteration) from iterations").fetchone() == (n - 1,)
        assert db.execute("select count(*) from turns").fetchone() == (40 * (n - 1),)
        store.close()
    assert steps[100] < 10 * steps[10], steps  # 10x the run: linear at most, not quadratic


def test_stats_sum_a_long_run_into_spans_of_iterations(tmp_path):
    from memory.query import open_readonly, stats

    _store_of(tmp_path / "memory.db", 5, replay="t1.0").close()
    db = open_readonly(tmp_path / "memory.db")
    # 5 iterations in 2 spans of ceil(5/2) = 3: iterations 1-3 hold 3 x 40 attempts, 1 in 4 solved
    # (0.25); 4-5 hold 2 x 40 + the replay's 4, all 4 solved: (20 + 4) / 84 = 0.2857
    rows = [(r["first"], r["last"], r["turns"], round(r["solve_rate"], 4)) for r in stats(db, 2)["by_span"]]
    assert rows == [(1, 3, 120, 0.25), (4, 5, 84, 0.2857)]
    assert [(r["first"], r["last"], r["turns"]) for r in stats(db, 0)["by_span"]] == [(i, i, 40 + 4 * (i == 5)) for i in range(1, 6)]
    assert len(stats(db)["by_span"]) == 5  # fewer iterations than spans: one row each


def test_sql_streams_its_rows_instead_of_reading_the_whole_result_first(tmp_path):
    # `selfplay memory sql "select * from turns"` on a 16x run read all 764k rows before printing the
    # first (952 MB peak; streamed: 146 MB, the imports). Now rows come as SQLite steps to them: taking 3
    # of a 100,000-row result costs a few progress-handler calls (one per 100 VM steps), where reading it
    # all first costs thousands.
    from itertools import islice

    from memory.query import open_readonly, sql

    _store_of(tmp_path / "memory.db", 1).close()
    db = open_readonly(tmp_path / "memory.db")
    count = [0]
    db.conn.set_progress_handler(lambda: count.__setitem__(0, count[0] + 1) or 0, 100)
    cols, rows = sql(db, "with recursive n(i) as (select 1 union all select i + 1 from n where i < 100000) select i from n")
    assert cols == ["i"] and list(islice(rows, 3)) == [(1,), (2,), (3,)]
    assert count[0] < 50, count[0]


def test_sql_error_while_reading_rows_is_one_line(run_dir):
    # SQLite raises some errors only when it steps to a row; the streamed loop must still turn them into one line
    r = cli("memory", "sql", "--run", run_dir, "select abs(-9223372036854775808)")
    assert r.returncode == 2 and "integer overflow" in r.stderr and "Traceback" not in r.stderr


def test_write_through_sql_is_refused_and_store_unchanged(run_dir):
    before = cli("memory", "sql", "--run", run_dir, "select count(*) from episodes").stdout.strip()
    r = cli("memory", "sql", "--run", run_dir, "DELETE FROM episodes")
    assert r.returncode == 2 and "read-only" in r.stderr and "Traceback" not in r.stderr
    assert cli("memory", "sql", "--run", run_dir, "select count(*) from episodes").stdout.strip() == before == "8"


@pytest.mark.parametrize("query,made", [
    ("ATTACH DATABASE '{d}/x.db' AS x", "x.db"),
    ("VACUUM INTO '{d}/copy.db'", "copy.db"),
    ("PRAGMA user_version = 7", None),
])
def test_sql_cannot_attach_vacuum_into_or_create_files(run_dir, tmp_path, query, made):
    # mode=ro alone let ATTACH + CREATE TABLE and VACUUM INTO create new database files
    r = cli("memory", "sql", "--run", run_dir, query.format(d=tmp_path))
    assert r.returncode == 2 and "read-only" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []
    assert cli("memory", "sql", "--run", run_dir, "PRAGMA user_version").stdout.strip() == "0"


def test_stats_show_search_export(run_dir, tmp_path):
    r = cli("memory", "stats", "--run", run_dir, "--spans", "1")
    assert r.returncode == 0 and "episodes 8" in r.stdout and "1-2" in r.stdout  # both iterations in one span
    r = cli("memory", "show", "--run", run_dir, "1.0")
    assert r.returncode == 0 and "student:attempt" in r.stdout
    assert cli("memory", "show", "--run", run_dir, "nope").returncode == 2
    r = cli("memory", "search", "--run", run_dir, "S")  # every attempt prompt starts with S:
    assert r.returncode == 0 and "student:attempt" in r.stdout
    out = tmp_path / "turns.jsonl"
    assert cli("memory", "export", "--run", run_dir, "--format", "jsonl", "--out", out).returncode == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and {"role", "kind", "reward", "advantage"} <= set(rows[0])
    pq = pytest.importorskip("pyarrow.parquet")  # CI installs the parquet extra
    assert cli("memory", "export", "--run", run_dir, "--format", "parquet", "--out", tmp_path / "t.parquet").returncode == 0
    t = pq.read_table(tmp_path / "t.parquet")
    assert t.num_rows == len(rows) and t.column("id").to_pylist() == [r["id"] for r in rows]
    # typed from the store's schema, not from the values: the judge share is empty in a verifier-paid run
    assert str(t.schema.field("judge").type) == "double" and t.column("judge").null_count == len(rows)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["t.parquet", "turns.jsonl"]  # no .part left
    r = cli("memory", "export", "--run", run_dir, "--out", tmp_path / "nodir" / "t.jsonl")
    assert r.returncode == 2 and "no folder" in r.stderr and ".part" not in r.stderr and "Traceback" not in r.stderr


def test_eval_json_and_user_errors(run_dir, tmp_path):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"numbers": [3, 7, 25], "target": 21}\n{"numbers": [2, 3], "target": 5}\n')
    r = cli("eval", "--run", run_dir, "--tasks", tasks, "--samples", "2", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["n_tasks"] == 2 and 0 <= res["solve_rate"] <= 1 and "greedy_solve_rate" in res
    for args, msg in ((("run", "--set", "trainer.lrr=1"), "trainer.lrr"),
                      (("run", "--config", tmp_path / "missing.yaml"), "not found"),
                      (("eval", "--run", run_dir, "--tasks", tmp_path / "none.jsonl"), "none.jsonl"),
                      (("run", "--out", run_dir), "--resume")):
        r = cli(*args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
