"""Ablation grid: variants x seeds, each cell a full run at the same budget.

An ablation YAML is a base config plus
    variants: {name: {dotted.key: value, ...}, ...}
    seeds: [0, 1, 2]
    hard: {dotted eval overrides}   # optional: a hard held-out split evaluated after each cell
Every cell stops at the base config's budget: `max_total_flops` (student + tutor model FLOPs,
generation and training: equal compute) or `max_student_samples` (hinted attempts count).
Once every cell has finished, the grid's table and plots are written (selfplay/grid_report.py:
results at each cell's end and at the largest total-FLOPs budget every cell reached, and each
variant minus the first one listed, paired on the same held-out tasks). `--tasks NAME=FILE` adds a
column and a paired table per task file (each finished cell is scored on it once, and again if the
file changes). Cells with a summary.json are reused; a cell dir without one is resumed. `--only
VARIANT[:SEED]` runs some cells (the rest on another machine, or later); the table is written once
every cell has finished.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from selfplay.config import ConfigError, build_config
from selfplay.grid_report import cell_summary, plot_grid, plot_proxy_truth, results_table


def cell_share(d: Path, cfg) -> float:
    """The share of a cell's budget spent (`budget_share`, as its run computes it), from the last
    complete line of its metrics.jsonl that carries the totals; 0 before its first iteration."""
    from selfplay.compute import budget_share

    try:
        with open(d / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 65536))  # its tail: a 16x cell writes ~7,000 lines (5-7 MB)
            tail = f.read()
    except OSError:
        return 0.0
    for line in reversed(tail.splitlines()):
        try:
            m = json.loads(line)
        except ValueError:  # a line being written, or the first one cut by the tail
            continue
        if "flops/total" in m:
            return budget_share(cfg, m.get("iteration", 0), m.get("samples/student", 0), m["flops/total"])
    return 0.0


def grid_configs(path: Path, sets: list[str]) -> tuple[list[str], list[int], dict | None, dict]:
    """(variant names, seeds, hard-split overrides, {(variant, seed): RunConfig}) of an ablation
    file: every cell's config built and validated (a ConfigError names the bad key)."""
    if not Path(path).is_file():
        raise ConfigError(f"ablation file not found: {path}")
    spec = yaml.safe_load(Path(path).read_text()) or {}
    variants, seeds, hard = spec.pop("variants", None), spec.pop("seeds", [0]), spec.pop("hard", None)
    if not variants:
        raise ConfigError(f"{path}: no 'variants'")
    cfgs = {(name, seed): build_config(spec, list(sets) + [f"{k}={json.dumps(v)}" for k, v in (ov or {}).items()]
                                       + [f"seed={seed}"])
            for name, ov in variants.items() for seed in seeds}
    return list(variants), seeds, hard, cfgs


def pick_cells(only: list[str], variants: list[str], seeds: list[int]) -> set[tuple[str, int]]:
    """The cells named by `--only` values, each VARIANT (all its seeds) or VARIANT:SEED."""
    cells = set()
    for x in only:
        name, _, seed = x.partition(":")
        if name not in variants or (seed and not (seed.isdigit() and int(seed) in seeds)):
            raise ConfigError(f"--only {x}: no such cell (variants: {', '.join(variants)}; "
                              f"seeds: {', '.join(map(str, seeds))})")
        cells |= {(name, int(seed))} if seed else {(name, s) for s in seeds}
    return cells


def task_sets(specs: list[str]) -> dict[str, tuple[str, list]]:
    """`--tasks NAME=FILE.jsonl` (repeatable): {name: (the file's sha256, its tasks)}, read and
    checked before any cell runs."""
    import hashlib

    from selfplay.domains.countdown import read_tasks

    out = {}
    for spec in specs:
        name, _, file = spec.partition("=")
        if not (name.isidentifier() and file):
            raise ConfigError(f"--tasks {spec}: expected NAME=FILE.jsonl, NAME a word (it names the table's column)")
        out[name] = (hashlib.sha256(Path(file).read_bytes()).hexdigest(), read_tasks(file))
    return out


def run_grid(path: Path, out: Path, sets: list[str], console=None, jobs: int = 1, only: list[str] = (),
             tasks: list[str] = ()) -> str:
    """Run every unfinished cell (in `jobs` processes at once), or those of them named by `only`
    (another machine may run the rest into a copy of `out`), evaluate each finished cell on the
    hard split and on every `tasks` file (NAME=FILE.jsonl: tasks no one here wrote, say), then
    write the table and plot once every cell is finished."""
    from selfplay.evaluate import heldout_tasks
    from selfplay.loop import run

    variants, seeds, hard, cfgs = grid_configs(path, sets)  # every cell validated before spending compute
    extra = task_sets(list(tasks))
    picked = pick_cells(only, variants, seeds) if only else set(cfgs)
    out.mkdir(parents=True, exist_ok=True)
    todo = [(k, cfg) for k, cfg in cfgs.items() if k in picked and cell_summary(out / k[0] / f"seed{k[1]}") is None]
    if jobs > 1:
        _run_parallel([(out / n / f"seed{s}", cfg) for (n, s), cfg in todo], jobs, console)
    for (name, seed), cfg in todo if jobs == 1 else []:
        d = out / name / f"seed{seed}"
        if console:
            console.print(f"[bold]cell[/bold] {name} seed {seed}")
        run(cfg, d, resume=(d / "config.yaml").is_file(), console=console)
    for (name, seed), cfg in cfgs.items():
        d = out / name / f"seed{seed}"
        if cell_summary(d) is None:
            continue
        if hard and not (d / "eval_hard.json").is_file():
            hcfg = build_config(cfg.model_dump(mode="json"), [f"eval.{k}={json.dumps(v)}" for k, v in hard.items()])
            _eval_cell(hcfg, d, heldout_tasks(hcfg.eval), d / "eval_hard.json")
        for tname, (sha, ts) in extra.items():
            p = d / f"eval-{tname}.json"
            if not p.is_file() or json.loads(p.read_text()).get("tasks_sha256") != sha:  # another file, same name
                if console:
                    console.print(f"evaluating {name}/seed{seed} on {tname} ({len(ts)} tasks)", highlight=False)
                _eval_cell(cfg, d, ts, p, {"tasks_sha256": sha})
    left = [f"{n}:{s}" for n, s in cfgs if cell_summary(out / n / f"seed{s}") is None]
    if left:
        return f"{len(cfgs) - len(left)} of {len(cfgs)} cells finished; the table waits for {', '.join(left)}\n"
    table = results_table(out, variants, seeds, hard is not None, list(extra))
    (out / "results.md").write_text(table)
    plot_grid(out, variants, seeds)
    plot_proxy_truth(out, variants, seeds)
    return table


REPORT_EVERY_S = 300.0  # a grid's cells run for minutes to hours: how often it says where each one stands


def _run_parallel(cells: list[tuple[Path, object]], jobs: int, console=None) -> None:
    """Each cell in its own `selfplay run --resume DIR` process (its config.yaml written first; a
    fresh dir resumes from iteration 0), with model.threads as configured, at most `jobs` processes
    at once: a policy_lag 1 cell counts two (its learner is a second process). Every
    `REPORT_EVERY_S` a line per running cell (budget spent, time, ETA), and a line as each one ends.
    A failed cell is reported once the others have finished; an interrupt stops every running cell."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from selfplay.reporting import _dur

    procs: list = []
    pending = list(cells)
    started: dict[Path, tuple[float, float]] = {}  # cell -> (start time, budget share then: a resumed cell's)
    say = console.print if console else (lambda *a, **k: None)
    name = lambda d: f"{d.parent.name}/{d.name}"  # noqa: E731
    failed = []

    def busy() -> int:
        return sum(n for _, _, _, n, _ in procs)

    def ended(d: Path, code: int) -> None:
        took = _dur(time.perf_counter() - started[d][0])
        s = cell_summary(d) if code == 0 else None
        if s:
            b, a = s["before"]["solve_rate"], s["after"]["solve_rate"]
            say(f"done {name(d)} in {took}: held-out solve rate {b:.3f} -> {a:.3f}", highlight=False)
        else:  # the other cells go on: stopping here would orphan them
            failed.append(f"cell {d} failed (exit {code}); see {d / 'run.log'}")
            say(f"[red]failed[/red] {name(d)} after {took} (exit {code}): {d / 'run.log'}", highlight=False)

    last_report = time.perf_counter()
    try:
        while pending or procs:
            while pending and (not procs or busy() + 1 + pending[0][1].trainer.policy_lag <= jobs):
                d, cfg = pending.pop(0)
                d.mkdir(parents=True, exist_ok=True)
                if not (d / "config.yaml").is_file():
                    (d / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
                say(f"[bold]cell[/bold] {d}")
                started[d] = (time.perf_counter(), cell_share(d, cfg))
                log = open(d / "run.log", "a")
                procs.append((d, log, subprocess.Popen([sys.executable, "-m", "selfplay.cli", "run", "--resume", str(d)],
                                                       stdout=log, stderr=subprocess.STDOUT), 1 + cfg.trainer.policy_lag, cfg))
            time.sleep(min(1.0, REPORT_EVERY_S))
            for item in list(procs):
                d, log, p, _, _ = item
                if p.poll() is not None:
                    log.close()
                    procs.remove(item)
                    ended(d, p.returncode)
            if procs and time.perf_counter() - last_report >= REPORT_EVERY_S:
                last_report = time.perf_counter()
                for d, _, _, _, cfg in procs:
                    t0, share0 = started[d]
                    share, elapsed = cell_share(d, cfg), time.perf_counter() - t0
                    eta = _dur(elapsed / (share - share0) * (1 - share)) if share > share0 else "?"
                    say(f"  {name(d)}: {share:.0%} of its budget, {_dur(elapsed)}, eta {eta}", highlight=False)
    except BaseException:  # Ctrl-C (or a failure here): stop the cells too; each resumes from its last checkpoint
        for _, _, p, _, _ in procs:
            p.send_signal(signal.SIGINT)
        for _, log, p, _, _ in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            log.close()
        raise
    if failed:
        raise RuntimeError("; ".join(failed))


def _eval_cell(cfg, d: Path, tasks: list, path: Path, extra: dict | None = None) -> None:
    """A finished cell's student on `tasks` with `cfg`'s eval settings (samples, temperature), as
    `selfplay eval --run` scores it; per-task rates kept for the paired table."""
    import torch

    from selfplay.evaluate import evaluate
    from selfplay.loop import make_backend
    from selfplay.policy import load_policy_from_run
    from selfplay.prompts import Prompts

    torch.set_num_threads(cfg.model.threads)
    pol = load_policy_from_run(d, cfg)
    res = evaluate(pol, make_backend(cfg, pol), Prompts(cfg.prompts), tasks, cfg, judge_attempts=0)
    path.write_text(json.dumps({**res, **(extra or {})}))
