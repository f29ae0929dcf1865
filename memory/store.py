"""The episode store: one SQLite file per run (sqlite-utils, WAL mode, schema migrations).

Tables
- runs(id, created, config, status)
- iterations(iteration, episodes, finished_at): one row per completed iteration, written in the
  same transaction as its episodes and turns, so a crash never leaves half an iteration.
- tasks(id, key, numbers, target, parent, source, first_iteration, attempts, solved): solve
  statistics are counts of unhinted student attempts.
- episodes(id, iteration, task_id, parent_task_id, mutated, solved, hint_rounds, n_turns), indexed by
  iteration and by task
- turns(id, episode_id, iteration, role, kind, adapter, adapter_version, group_id, prompt,
  completion, parsed, verdict, reward, advantage, prompt_tokens, completion_tokens, hint_round, hint,
  judge),
  hint_round 0 = an unhinted attempt (or a tutor turn outside hinting), hint = the hint an attempt
  was given, judge = the judge's share of Y votes when the judge pays the student (then `reward`
  is the proxy and `verdict` the verifier's truth),
  with full-text search over prompt + completion (`turns_fts`).
- metrics(iteration, name, value)

`EpisodeStore` writes (one transaction per iteration); `memory.query.open_readonly` reads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sqlite_utils import Database, Migrations

migrations = Migrations("selfplay.memory")


@migrations()
def m001_initial(db: Database) -> None:
    db["runs"].create({"id": str, "created": float, "config": str, "status": str}, pk="id")
    db["iterations"].create({"iteration": int, "episodes": int, "finished_at": float}, pk="iteration")
    db["tasks"].create({"id": str, "key": str, "numbers": str, "target": int, "parent": str,
                        "source": str, "first_iteration": int, "attempts": int, "solved": int}, pk="id")
    db["episodes"].create({"id": str, "iteration": int, "task_id": str, "parent_task_id": str,
                           "mutated": int, "solved": int, "hint_rounds": int, "n_turns": int}, pk="id")
    db["turns"].create({"id": int, "episode_id": str, "iteration": int, "role": str, "kind": str,
                        "adapter": str, "adapter_version": int, "group_id": str, "prompt": str,
                        "completion": str, "parsed": str, "verdict": str, "reward": float,
                        "advantage": float, "prompt_tokens": int, "completion_tokens": int}, pk="id")
    db["metrics"].create({"iteration": int, "name": str, "value": float}, pk=("iteration", "name"))
    db["episodes"].create_index(["iteration"])
    db["turns"].create_index(["episode_id"])
    db["turns"].create_index(["iteration", "role", "kind"])
    db["tasks"].create_index(["key"])
    db["turns"].enable_fts(["prompt", "completion"], create_triggers=True)


@migrations()
def m002_hints(db: Database) -> None:
    """The hint round of each turn as a column (0 = unhinted), instead of a group-id suffix, and the
    hint a hinted attempt was given (its completion starts with it when hints go in the response)."""
    db["turns"].add_column("hint_round", int)
    db["turns"].add_column("hint", str)
    db.execute("update turns set hint_round = case when group_id like '%:a' then 0 else 1 end")


@migrations()
def m003_judge(db: Database) -> None:
    """The judge's share of Y votes on a student attempt when the judge pays the student
    (rewards.student_source=judge; NULL otherwise): `reward` is then the proxy, `verdict` the truth."""
    db["turns"].add_column("judge", float)


@migrations()
def m004_episode_task_index(db: Database) -> None:
    """episodes(task_id): the resume's recount of a task's statistics looks its episodes up by task.
    Without it the recount scanned every episode once per task: a 16x run's resume (43,856 tasks
    and episodes, 695k turns) was still in it after 13 minutes of a core; now 1.0 s to build this
    index once and 0.65 s to truncate (`truncate_after`)."""
    db["episodes"].create_index(["task_id"], if_not_exists=True)


class EpisodeStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db = Database(self.path)
        self.db.enable_wal()
        migrations.apply(self.db)

    def start_run(self, run_id: str, config: dict) -> None:
        self.db["runs"].upsert({"id": run_id, "created": time.time(), "config": json.dumps(config),
                                "status": "running"}, pk="id")

    def set_status(self, run_id: str, status: str) -> None:
        self.db["runs"].update(run_id, {"status": status})

    def truncate_after(self, iteration: int) -> None:
        """Drop everything written after `iteration` (resume from a checkpoint replays it)."""
        with self.db.atomic():
            # only the tasks attempted after `iteration` have counts that include dropped turns
            touched = json.dumps([r[0] for r in self.db.execute(
                "select distinct task_id from episodes where iteration > ?", [iteration])])
            for t in ("turns", "episodes", "iterations", "metrics"):
                self.db.execute(f"delete from {t} where iteration > ?", [iteration])
            self.db.execute("delete from tasks where first_iteration > ?", [iteration])
            # recount their statistics from the turns that remain
            self.db.execute("""update tasks set
                attempts = (select count(*) from turns t join episodes e on t.episode_id = e.id
                            where e.task_id = tasks.id and t.kind = 'attempt' and t.hint_round = 0),
                solved = (select count(*) from turns t join episodes e on t.episode_id = e.id
                          where e.task_id = tasks.id and t.kind = 'attempt' and t.hint_round = 0
                          and t.verdict = 'solved')
                where id in (select value from json_each(?))""", [touched])

    def write_iteration(self, iteration: int, tasks: list[dict], episodes: list[dict], turns: list[dict],
                        metrics: dict[str, float]) -> None:
        """All of one iteration in one transaction (with its `iterations` row as the commit marker)."""
        with self.db.atomic():
            # a task seen before keeps its row and adds this iteration's counts
            self._insert("tasks", tasks, "on conflict(id) do update set attempts = attempts + excluded.attempts, "
                                         "solved = solved + excluded.solved")
            self._insert("episodes", episodes)
            self._insert("turns", turns)
            self._insert("metrics", [{"iteration": iteration, "name": k, "value": float(v)} for k, v in metrics.items()],
                         "on conflict(iteration, name) do update set value = excluded.value")
            self._insert("iterations", [{"iteration": iteration, "episodes": len(episodes), "finished_at": time.time()}],
                         "on conflict(iteration) do update set episodes = excluded.episodes, finished_at = excluded.finished_at")

    def _insert(self, table: str, rows: list[dict], upsert: str = "") -> None:
        """Rows with the same keys, of plain SQLite values, as multi-row inserts of up to 250 rows:
        sqlite-utils' insert_all spent 60% of an iteration's 8 ms write checking and converting
        types, and executemany's per-row steps and the tasks' select-then-update took 9.4 ms where
        this takes 2.5 (medians, a plain-GRPO run). `upsert`: an `on conflict ...` clause."""
        cols = list(rows[0]) if rows else []
        for i in range(0, len(rows), 250):  # 250 rows x 18 columns stays far below SQLite's 32,766 variables
            chunk = rows[i: i + 250]
            values = ", ".join([f"({', '.join('?' * len(cols))})"] * len(chunk))
            self.db.conn.execute(f"insert into [{table}] ({', '.join(cols)}) values {values} {upsert}",
                                 [r[c] for r in chunk for c in cols])

    def write_metrics(self, iteration: int, metrics: dict[str, float]) -> None:
        with self.db.atomic():
            self.db["metrics"].insert_all([{"iteration": iteration, "name": k, "value": float(v)}
                                           for k, v in metrics.items()], replace=True)

    def close(self) -> None:
        self.db.close()
