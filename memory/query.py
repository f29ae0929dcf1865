"""Read-only access to a run's episode store, for users and for the curriculum.

The file is opened with SQLite's `mode=ro` URI flag, so any write raises `sqlite3.OperationalError`
("attempt to write a readonly database") and leaves the file unchanged.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlite_utils import Database


def open_readonly(path: str | Path) -> Database:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no episode store at {p}")
    conn = sqlite3.connect(f"file:{p.resolve()}?mode=ro", uri=True)
    return Database(conn)


def sql(db: Database, query: str, params=()) -> tuple[list[str], list[tuple]]:
    """Run one statement; returns (column names, rows). Writes fail: the connection is read-only."""
    cur = db.execute(query, list(params))
    cols = [d[0] for d in cur.description or []]
    return cols, cur.fetchall()


def search(db: Database, text: str, limit: int = 20) -> list[dict]:
    """Full-text search over turn prompts and completions (FTS5 via sqlite-utils)."""
    return list(db["turns"].search(text, limit=limit,
                                   columns=["id", "episode_id", "iteration", "role", "kind", "prompt",
                                            "completion", "reward"]))


def episode(db: Database, episode_id: str) -> tuple[dict | None, list[dict]]:
    rows = list(db.query("select * from episodes where id = ?", [episode_id]))
    turns = list(db.query("select * from turns where episode_id = ? order by id", [episode_id]))
    return (rows[0] if rows else None), turns


def stats(db: Database) -> dict:
    count = lambda t: db.execute(f"select count(*) from {t}").fetchone()[0]  # noqa: E731
    by_iter = list(db.query("""
        select iteration, role, kind, count(*) as turns, avg(reward) as mean_reward,
               avg(case when verdict = 'solved' then 1.0 else 0.0 end) as solve_rate
        from turns group by iteration, role, kind order by iteration, role, kind"""))
    return {"runs": count("runs"), "iterations": count("iterations"), "tasks": count("tasks"),
            "episodes": count("episodes"), "turns": count("turns"), "by_iteration": by_iter}


def task_stats(db: Database) -> list[dict]:
    """Per-task unhinted solve statistics (what the curriculum reads on resume)."""
    return list(db.query("select id, key, numbers, target, parent, source, attempts, solved from tasks"))
