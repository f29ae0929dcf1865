"""Read-only access to a run's episode store, for users.

Two locks: the file is opened with SQLite's `mode=ro` URI flag, and an authorizer allows only
reading statements (SELECT, reads, functions, CTEs, and a few read-only PRAGMAs). `mode=ro` alone
still let `ATTACH DATABASE 'x.db'` + `CREATE TABLE x.t(...)` and `VACUUM INTO 'copy.db'` create
files; both are denied now, and attaching is limited to zero databases as well. A refused
statement raises `sqlite3.DatabaseError` ("not authorized" / "attempt to write a readonly
database") and changes nothing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from itertools import islice
from pathlib import Path
from typing import Iterator

from sqlite_utils import Database


_READING = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE,
            sqlite3.SQLITE_SAVEPOINT, sqlite3.SQLITE_TRANSACTION}  # sqlite-utils wraps reads in savepoints
_TABLE_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
_QUERY_PRAGMAS = {"table_list", "compile_options", "user_version", "schema_version", "page_count", "page_size",
                  "data_version", "database_list", "function_list", "module_list", "pragma_list", "encoding",
                  "journal_mode", "freelist_count", "collation_list"}


def _authorize(action, arg1, arg2, _db, _trigger):
    if action in _READING:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and (arg1 in _TABLE_PRAGMAS or (arg1 in _QUERY_PRAGMAS and arg2 is None)):
        return sqlite3.SQLITE_OK  # a PRAGMA with a value (user_version = 5) sets: denied
    if action == sqlite3.SQLITE_UPDATE and arg1 == "sqlite_master":
        return sqlite3.SQLITE_OK  # FTS5's table constructor asks for this; mode=ro refuses a real write
    return sqlite3.SQLITE_DENY


def open_readonly(path: str | Path) -> Database:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no episode store at {p}")
    conn = sqlite3.connect(f"file:{p.resolve()}?mode=ro", uri=True)
    db = Database(conn)  # sqlite-utils sets a PRAGMA on open: lock after it
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.set_authorizer(_authorize)
    return db


def sql(db: Database, query: str, params=()) -> tuple[list[str], Iterator[tuple]]:
    """Run one statement; returns (column names, its rows as they are read). Rows are streamed: a
    `select * from turns` on a 16x run is 764k rows, which `fetchall` held in memory at once. A
    refused statement fails here, a runtime error while reading rows fails in the iteration. Writes
    fail: the connection is read-only."""
    cur = db.execute(query, list(params))
    cols = [d[0] for d in cur.description or []]
    return cols, iter(cur)


def search(db: Database, text: str, limit: int = 20) -> list[dict]:
    """Full-text search over turn prompts and completions (FTS5 via sqlite-utils)."""
    return list(db["turns"].search(text, limit=limit,
                                   columns=["id", "episode_id", "iteration", "role", "kind", "prompt",
                                            "completion", "reward"]))


def episode(db: Database, episode_id: str) -> tuple[dict | None, list[dict]]:
    rows = list(db.query("select * from episodes where id = ?", [episode_id]))
    turns = list(db.query("select * from turns where episode_id = ? order by id", [episode_id]))
    return (rows[0] if rows else None), turns


def stats(db: Database, spans: int = 20) -> dict:
    """Counts, and per role and turn kind the turns, mean reward and solve rate over at most `spans`
    equal spans of iterations (0: every iteration; a 16x run has 5,000 of them)."""
    count = lambda t: db.execute(f"select count(*) from {t}").fetchone()[0]  # noqa: E731
    last = db.execute("select max(iteration) from turns").fetchone()[0] or 0
    width = max(1, -(-last // spans)) if spans > 0 else 1  # iterations per span (ceil)
    by_span = list(db.query("""
        select min(iteration) as first, max(iteration) as last, role, kind, count(*) as turns,
               avg(reward) as mean_reward, avg(case when verdict = 'solved' then 1.0 else 0.0 end) as solve_rate
        from turns group by (iteration - 1) / ?, role, kind order by first, role, kind""", [width]))
    return {"runs": count("runs"), "iterations": count("iterations"), "tasks": count("tasks"),
            "episodes": count("episodes"), "turns": count("turns"), "by_span": by_span}


def export(db: Database, table: str, fmt: str, out: Path | None, batch: int = 50_000) -> int:
    """Write `table` as JSONL (to `out`, or stdout) or parquet (to `out`, default TABLE.parquet),
    streamed: a 16x run's 764k turns once took 2 GB of memory as one list. Columns keep SQLite's
    declared types (parquet: INTEGER int64, REAL float64, the rest strings), so a column that is
    empty in the first batch is typed like the rest. A file is written to a .part name and renamed
    when complete. Returns the rows written."""
    if table not in db.table_names():
        raise ValueError(f"no table {table!r}")
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"unknown format {fmt!r} (jsonl or parquet)")
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("parquet export needs pyarrow: pip install 'selfplay[parquet]'") from None
        out = out or Path(f"{table}.parquet")
    if out is not None and not out.parent.is_dir():  # else the error would name the .part file
        raise ValueError(f"no folder {out.parent} for {out.name}: create it first")
    rows, n = db[table].rows, 0
    part = None if out is None else out.with_name(out.name + ".part")
    if fmt == "jsonl":
        fh = sys.stdout if part is None else open(part, "w")
        try:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
                n += 1
        finally:
            if fh is not sys.stdout:
                fh.close()
    else:
        types = {"INTEGER": pa.int64(), "REAL": pa.float64(), "FLOAT": pa.float64()}
        schema = pa.schema([(c.name, types.get(c.type.upper(), pa.string())) for c in db[table].columns])
        with pq.ParquetWriter(str(part), schema) as w:
            while chunk := list(islice(rows, batch)):
                w.write_table(pa.Table.from_pylist(chunk, schema=schema))
                n += len(chunk)
    if part is not None:
        os.replace(part, out)
    return n
