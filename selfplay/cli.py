"""`selfplay` command line: run, eval, bootstrap, ablate, memory, vllm-serve.

User mistakes (bad config, missing files, a write through `memory sql`) print one line
`error: ...` and exit 2; no traceback.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Self-play RL: a student and a tutor adapter on one base.")
mem = typer.Typer(no_args_is_help=True, help="Query a run's episode store (read-only).")
app.add_typer(mem, name="memory")
console = Console(stderr=True)
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError, sqlite3.Error, KeyError)


def _fail(msg: str) -> None:
    console.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _config(config: Optional[Path], sets: List[str]):
    from selfplay.config import load_config

    return load_config(config, sets or [])


def _interruptible() -> None:
    """SIGTERM (a scheduler's time limit, `kill`) stops a run or grid as Ctrl-C does, and SIGINT is
    honoured even where the shell left it ignored (`nohup cmd &` from a script): the grid's cells
    inherit that, so its interrupt would otherwise not reach them and they would run on, orphaned."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop)


RUNS = Path("runs")


def _latest_run() -> Path:
    runs = sorted((p for p in RUNS.glob("*") if (p / "memory.db").is_file()), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError("no run found under ./runs; pass --run DIR")
    return runs[-1]


@app.command()
def run(config: Optional[Path] = typer.Option(None, help="YAML config (default: configs/countdown-tiny.yaml)."),
        set: List[str] = typer.Option([], "--set", help="Dotted override, e.g. trainer.lr=3e-4 (repeatable)."),
        out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/<timestamp>)."),
        resume: Optional[Path] = typer.Option(None, help="Continue the run in this directory."),
        quiet: bool = typer.Option(False, help="No progress bar and no progress lines.")):
    """Train the student and tutor by self-play; evaluate before and after."""
    from selfplay.loop import run as run_loop

    _interruptible()
    try:
        if resume:
            if config or set:
                raise ValueError("--resume continues with the run's own config.yaml; drop --config/--set")
            summary = run_loop(None, resume, resume=True, console=console, quiet=quiet)
        else:
            cfg = _config(config, set)
            summary = run_loop(cfg, out or RUNS / time.strftime("run-%Y%m%d-%H%M%S"), console=console, quiet=quiet)
    except USER_ERRORS as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        _fail("interrupted; memory holds every completed iteration: continue with `selfplay run --resume DIR`")
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return
    print(json.dumps({"iterations": summary["iterations"], **summary["improvement"],
                      "before": summary["before"]["solve_rate"], "after": summary["after"]["solve_rate"]}))


@app.command("vllm-serve")
def vllm_serve(port: int = typer.Option(8001, help="Port to listen on."),
               host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
               config: Optional[Path] = typer.Option(None, help="The run's YAML config (its base and LoRA rank)."),
               set: List[str] = typer.Option([], "--set", help="Dotted override (repeatable)."),
               dry_run: bool = typer.Option(False, help="Print the command instead of running it.")):
    """Start a vLLM OpenAI server for `model.backend=vllm_server` (needs vLLM in this venv)."""
    from selfplay.policy import ensure_base
    from selfplay.vllm_server import server_command

    try:
        cfg = _config(config, set)
        base = ensure_base(cfg)
    except USER_ERRORS as e:
        _fail(str(e).splitlines()[0])
    cmd = [sys.executable, *server_command(cfg, str(base), port), "--host", host]
    if dry_run:
        print(" ".join(cmd))
        return
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # /v1/load_lora_adapter at run time
    os.execv(sys.executable, cmd)


@app.command("eval")
def eval_cmd(run: Optional[Path] = typer.Option(None, "--run", help="Run directory (its config and adapters)."),
             tasks: Optional[Path] = typer.Option(None, help="JSONL task file (default: the held-out set)."),
             samples: Optional[int] = typer.Option(None, help="k samples per task."),
             base: bool = typer.Option(False, help="Evaluate the base model with adapters disabled."),
             config: Optional[Path] = typer.Option(None, help="Config when no --run is given."),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Solve rate (sampled and greedy) of a run's student, or of the base, on a task file."""
    import torch
    import yaml

    from selfplay.config import build_config
    from selfplay.domains.countdown import read_tasks
    from selfplay.evaluate import evaluate, heldout_tasks
    from selfplay.loop import make_backend
    from selfplay.policy import Policy, load_policy_from_run
    from selfplay.prompts import Prompts

    try:
        if run:
            if not (run / "config.yaml").is_file():
                raise FileNotFoundError(f"{run} is not a selfplay run dir (no config.yaml)")
            cfg = build_config(yaml.safe_load((run / "config.yaml").read_text()))
        elif base:
            cfg = _config(config, [])
        else:
            raise ValueError("give --run DIR (or --base to evaluate the base model)")
        torch.set_num_threads(cfg.model.threads)
        pol = Policy(cfg) if (base and not run) else load_policy_from_run(run, cfg)
        ts = read_tasks(tasks) if tasks else heldout_tasks(cfg.eval)
        res = evaluate(pol, make_backend(cfg, pol), Prompts(cfg.prompts), ts, cfg, samples=samples, base=base)
    except USER_ERRORS as e:
        _fail(str(e).splitlines()[0])
    res.pop("per_task")
    if as_json:
        print(json.dumps(res))
    else:
        console.print(res)


@app.command()
def bootstrap(config: Optional[Path] = typer.Option(None, help="YAML config (its bootstrap section)."),
              set: List[str] = typer.Option([], "--set", help="Dotted override, e.g. bootstrap.seconds=60."),
              force: bool = typer.Option(False, help="Rebuild even when cached.")):
    """(Re)build the embedded tiny base and print its stats."""
    import shutil

    import torch

    from selfplay.bootstrap import base_dir, base_stats, pretrain

    try:
        cfg = _config(config, set)
    except USER_ERRORS as e:
        _fail(str(e))
    torch.set_num_threads(cfg.model.threads)
    out = base_dir(cfg.bootstrap, cfg.model.cache_dir)
    if force or not (out / "bootstrap.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        with console.status("pretraining the tiny base") as st:
            pretrain(cfg.bootstrap, out, lambda s, t, l: st.update(f"step {s}  {t:.0f}s  loss {l:.3f}"))
    stats = base_stats(out, cfg)
    print(json.dumps(stats, indent=2))


@app.command()
def ablate(config: Path = typer.Option(..., help="Ablation YAML: a base config plus `variants` and `seeds`."),
           out: Optional[Path] = typer.Option(None, help="Output dir (default: runs/ablate-<name>)."),
           set: List[str] = typer.Option([], "--set", help="Override applied to every cell."),
           jobs: int = typer.Option(1, min=1, help="Processes at once: each cell runs in its own, a policy_lag 1 "
                                                    "cell in two (its learner); give each --set model.threads=1."),
           only: List[str] = typer.Option([], "--only", help="Run only this cell (VARIANT:SEED) or variant (VARIANT); "
                                                             "repeatable. The table waits for every cell."),
           tasks: List[str] = typer.Option([], "--tasks", help="NAME=FILE.jsonl: also evaluate every finished cell on "
                                                               "these tasks (a column and a paired table); repeatable.")):
    """Run a grid of variants x seeds at equal budgets; write a table and plots."""
    from selfplay.ablate import run_grid

    _interruptible()
    try:
        res = run_grid(config, out or RUNS / f"ablate-{config.stem}", set, console, jobs, only, tasks)
    except USER_ERRORS as e:
        _fail(str(e).splitlines()[0])
    except KeyboardInterrupt:
        _fail("interrupted; finished cells are kept and the others resume from their last checkpoints: "
              "run the same command again")
    print(res)


def _ro(run: Optional[Path]):
    from memory.query import open_readonly

    return open_readonly((run or _latest_run()) / "memory.db")


@mem.command("stats")
def mem_stats(run: Optional[Path] = typer.Option(None, "--run", help="Run dir (default: latest)."),
              spans: int = typer.Option(20, min=0, help="Rows per role and turn kind: equal spans of iterations "
                                                         "(0: one per iteration).")):
    """Counts and solve rates by span of iterations and role."""
    from memory.query import stats

    try:
        s = stats(_ro(run), spans)
    except USER_ERRORS as e:
        _fail(str(e))
    from rich.table import Table

    print(f"runs {s['runs']}  iterations {s['iterations']}  tasks {s['tasks']}  episodes {s['episodes']}  turns {s['turns']}")
    t = Table("iterations", "role", "kind", "turns", "mean reward", "solve rate")
    for r in s["by_span"]:
        its = str(r["first"]) if r["first"] == r["last"] else f"{r['first']}-{r['last']}"
        t.add_row(its, r["role"], r["kind"], str(r["turns"]), "" if r["mean_reward"] is None else f"{r['mean_reward']:.3f}",
                  f"{r['solve_rate']:.3f}" if r["kind"] == "attempt" else "")
    Console().print(t)


@mem.command("sql")
def mem_sql(query: str, run: Optional[Path] = typer.Option(None, "--run", help="Run dir (default: latest)."),
            as_json: bool = typer.Option(False, "--json", help="One JSON object per row.")):
    """Run a read-only SQL query (writes are refused)."""
    from memory.query import sql

    try:
        cols, rows = sql(_ro(run), query)
        for r in rows:  # streamed: a row is printed as soon as SQLite reads it
            print(json.dumps(dict(zip(cols, r))) if as_json else "\t".join(map(str, r)))
    except sqlite3.DatabaseError as e:
        refused = any(w in str(e) for w in ("readonly", "not authorized", "authorization denied"))
        _fail(f"{e}: the episode store is read-only (reading statements only)" if refused else str(e))
    except USER_ERRORS as e:
        _fail(str(e))


@mem.command("search")
def mem_search(text: str, run: Optional[Path] = typer.Option(None, "--run", help="Run dir (default: latest)."),
               limit: int = typer.Option(20, help="Most rows.")):
    """Full-text search over turn prompts and completions."""
    from memory.query import search

    try:
        rows = search(_ro(run), text, limit)
    except USER_ERRORS as e:
        _fail(str(e))
    for r in rows:
        print(f"{r['episode_id']}\t{r['role']}:{r['kind']}\t{r['prompt']!r} -> {r['completion']!r}\treward={r['reward']}")


@mem.command("show")
def mem_show(episode_id: str, run: Optional[Path] = typer.Option(None, "--run", help="Run dir (default: latest).")):
    """One episode, turn by turn."""
    from memory.query import episode

    try:
        ep, turns = episode(_ro(run), episode_id)
    except USER_ERRORS as e:
        _fail(str(e))
    if ep is None:
        _fail(f"no episode {episode_id!r}")
    print(f"episode {ep['id']}  iteration {ep['iteration']}  task {ep['task_id']}  solved {bool(ep['solved'])}  "
          f"hint rounds {ep['hint_rounds']}")
    for t in turns:
        adv = "" if t["advantage"] is None else f" adv={t['advantage']:+.2f}"
        print(f"  [{t['role']}:{t['kind']} {t['group_id']}] {t['prompt']} -> {t['completion']!r}  "
              f"verdict={t['verdict']} reward={t['reward']}{adv}")


@mem.command("export")
def mem_export(run: Optional[Path] = typer.Option(None, "--run", help="Run dir (default: latest)."),
               format: str = typer.Option("jsonl", help="jsonl or parquet."),
               table: str = typer.Option("turns", help="Table to export."),
               out: Optional[Path] = typer.Option(None, help="Output file (default: stdout for jsonl).")):
    """Export a table as JSONL (or parquet, with pyarrow installed), streamed."""
    from memory.query import export

    try:
        export(_ro(run), table, format, out)
    except USER_ERRORS as e:
        _fail(str(e))


def main() -> None:
    from selfplay.reporting import quiet_libraries

    quiet_libraries()
    app()


if __name__ == "__main__":
    main()
