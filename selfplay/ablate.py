"""Ablation grid: variants x seeds, each cell a full run at the same budget.

An ablation YAML is a base config plus
    variants: {name: {dotted.key: value, ...}, ...}
    seeds: [0, 1, 2]
    hard: {dotted eval overrides}   # optional: a hard held-out split evaluated after each cell
Every cell stops at the base config's budget: `max_total_flops` (student + tutor model FLOPs,
generation and training: equal compute) or `max_student_samples` (hinted attempts count).
Results are reported at the end of each cell and, by interpolating each cell's eval curve, at the
largest total-FLOPs budget every cell reached. The environment's solver time is reported beside
(it is CPU work outside the model). Below the table, each variant minus the first one listed
(the grid's reference), paired on the same held-out tasks within a seed, then over seeds: the
comparison the README quotes. `--tasks NAME=FILE` adds a column and a paired table per task file
(each finished cell is scored on it once, and again if the file changes). Cells with a
summary.json are reused; a cell dir without one is resumed. `--only VARIANT[:SEED]` runs some
cells (the rest on another machine, or later); the table is written once every cell has finished.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from selfplay.config import ConfigError, build_config
from selfplay.evaluate import _mean_se


def _cell_summary(d: Path) -> dict | None:
    p = d / "summary.json"
    return json.loads(p.read_text()) if p.is_file() else None


def cell_share(d: Path, cfg) -> float:
    """The share of a cell's budget spent (`budget_share`, as its run computes it), from the last
    complete line of its metrics.jsonl that carries the totals; 0 before its first iteration."""
    from selfplay.loop import budget_share

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


def _curve(d: Path) -> list[tuple[float, float, float]]:
    """(student samples, total FLOPs, eval solve rate) at every evaluation of a cell."""
    out, last = [], {}
    for line in (d / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "samples/student" in r:
            last = r
        if "eval/solve_rate" in r:
            out.append((last.get("samples/student", 0), last.get("flops/total", 0.0), r["eval/solve_rate"]))
    return out


def _interp(curve, x_index: int, x: float) -> float:
    pts = sorted((c[x_index], c[2]) for c in curve)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1] if pts and x >= pts[-1][0] else (pts[0][1] if pts else float("nan"))


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
    todo = [(k, cfg) for k, cfg in cfgs.items() if k in picked and _cell_summary(out / k[0] / f"seed{k[1]}") is None]
    if jobs > 1:
        _run_parallel([(out / n / f"seed{s}", cfg) for (n, s), cfg in todo], jobs, console)
    for (name, seed), cfg in todo if jobs == 1 else []:
        d = out / name / f"seed{seed}"
        if console:
            console.print(f"[bold]cell[/bold] {name} seed {seed}")
        run(cfg, d, resume=(d / "config.yaml").is_file(), console=console)
    for (name, seed), cfg in cfgs.items():
        d = out / name / f"seed{seed}"
        if _cell_summary(d) is None:
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
    left = [f"{n}:{s}" for n, s in cfgs if _cell_summary(out / n / f"seed{s}") is None]
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
        s = _cell_summary(d) if code == 0 else None
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


def _fmt(xs: list[float], digits: int = 3) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "–"
    m, se = _mean_se(xs)
    return f"{m:.{digits}f} ± {se:.{digits}f}"


def results_table(out: Path, variants: list[str], seeds: list[int], hard: bool, task_names: list[str] = ()) -> str:
    cells = {(v, s): out / v / f"seed{s}" for v in variants for s in seeds}
    sums = {k: _cell_summary(d) for k, d in cells.items()}
    curves = {k: _curve(d) for k, d in cells.items()}
    f_star = min(s["flops"]["flops/total"] for s in sums.values())  # every cell reached this much compute
    head = ["variant", "sampled solve (before)", "sampled solve (after)", "non-flat solve (after)", "greedy solve (after)",
            f"solve @ {f_star:.2e} FLOPs", "student samples", "tutor samples", "student TFLOPs", "tutor TFLOPs",
            "solver s", "hinted solve rate", "hint revealed", "identical hint groups", "judge balanced acc",
            "mutation validity"]
    if hard:
        head.append("hard split solve")
    head += [f"{t} solve (after)" for t in task_names]
    judged = any("goodhart" in x for x in sums.values())
    if judged:  # rewards.student_source=judge cells: the proxy against the truth
        head += ["train judge reward, first → last 5 it", "train true solve, first → last 5 it",
                 "judge false accepts", "proxy parted from truth at it"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        S = [sums[v, s] for s in seeds]
        metrics = [_metric_means(cells[v, s]) for s in seeds]
        row = [v, _fmt([x["before"]["solve_rate"] for x in S]), _fmt([x["after"]["solve_rate"] for x in S]),
               _fmt([x["after"].get("solve_rate_nonflat", float("nan")) for x in S]),
               _fmt([x["after"]["greedy_solve_rate"] for x in S]),
               _fmt([_interp(curves[v, s], 1, f_star) for s in seeds]),
               f"{sum(x['totals']['samples/student'] for x in S) / len(S):.0f}",
               f"{sum(x['totals']['samples/tutor'] for x in S) / len(S):.0f}",
               f"{sum(x['flops']['flops/student'] for x in S) / len(S) / 1e12:.2f}",
               f"{sum(x['flops']['flops/tutor'] for x in S) / len(S) / 1e12:.2f}",
               f"{sum(x.get('env', {}).get('solver_seconds', 0.0) for x in S) / len(S):.1f}",
               _fmt([m.get("student/hinted_solve_rate", float("nan")) for m in metrics]),
               _fmt([m.get("tutor/hint_revealed", float("nan")) for m in metrics]),
               _fmt([m.get("tutor/hint_groups_identical", float("nan")) for m in metrics]),  # ~1: a frozen tutor
               _fmt([x["after"].get("judge_balanced_accuracy", float("nan")) for x in S]),
               _fmt([m.get("tutor/mutate_valid_rate", float("nan")) for m in metrics])]
        if hard:
            row.append(_fmt([json.loads((cells[v, s] / "eval_hard.json").read_text())["solve_rate"] for s in seeds]))
        row += [_fmt([json.loads((cells[v, s] / f"eval-{t}.json").read_text())["solve_rate"] for s in seeds])
                for t in task_names]
        if judged:
            g = [x.get("goodhart") for x in S]
            ends = [_ends(cells[v, s]) for s in seeds]
            row += [f"{_fmt([e[0] for e in ends], 2)} → {_fmt([e[1] for e in ends], 2)}",
                    f"{_fmt([e[2] for e in ends], 3)} → {_fmt([e[3] for e in ends], 3)}",
                    _fmt([m.get("judge/false_accept_rate", float("nan")) for m in metrics]),
                    ", ".join("never" if x["iteration"] is None else str(x["iteration"]) for x in g) if all(g) else "–"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"Before = the student at step 0 (its variant's base: variants may bootstrap different bases). "
                 f"Mean ± standard error over {len(seeds)} seeds; each cell evaluated on the same held-out tasks.")
    lines += paired_table(out, variants, seeds)
    for t in task_names:
        lines += paired_table(out, variants, seeds, f"eval-{t}.json", t)
    lines.append(provenance(list(sums.values())))
    return "\n".join(lines) + "\n"


def paired_table(out: Path, variants: list[str], seeds: list[int], file: str = "eval_after.json",
                 label: str = "held-out") -> list[str]:
    """Each variant minus the first (the grid's reference), in points of sampled solve rate on
    `file`'s tasks (the held-out set by default), paired on the same tasks: per seed the mean
    per-task difference ± its standard error over the tasks; over seeds the mean ± standard error
    of the per-seed differences (a seed's cells share their base and tasks, so its difference is
    free of the seed-to-seed spread)."""
    if len(variants) < 2:
        return []
    rates = {(v, s): json.loads((out / v / f"seed{s}" / file).read_text())["per_task"]
             for v in variants for s in seeds}
    ref = variants[0]
    head = ["difference (points)"] + [f"seed {s}" for s in seeds] + ["over seeds"] * (len(seeds) > 1)
    lines = ["", f"Paired on the same {label} tasks, each variant minus {ref}:", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants[1:]:
        per_seed = [_mean_se([100 * (a - b) for a, b in zip(rates[v, s], rates[ref, s], strict=True)]) for s in seeds]
        row = [f"{v} − {ref}"] + [f"{m:+.2f} ± {se:.2f}" for m, se in per_seed]
        if len(seeds) > 1:
            m, se = _mean_se([m for m, _ in per_seed])
            row.append(f"{m:+.2f} ± {se:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def provenance(summaries: list[dict]) -> str:
    """One line naming the code the cells ran (`summary["code"]`): a grid is comparable only if that
    is one commit with no local edits."""
    codes = [x.get("code") or {} for x in summaries]
    commits = sorted({c.get("commit", c.get("version", "unrecorded"))[:10] for c in codes})
    dirty = sum(bool(c.get("dirty")) for c in codes)
    line = f"Code: {', '.join(commits)}" + (f"; {dirty} of {len(codes)} cells ran with local edits" if dirty else "")
    return line + (" (cells ran on different code: compare with care)." if len(commits) > 1 or dirty else ".")


def _ends(d: Path, k: int = 5) -> tuple[float, float, float, float]:
    """Training judge reward and true solve rate over the first and the last k iterations."""
    rows = [r for r in (json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()) if "student/true_solve_rate" in r]

    def mean(rs, key):
        vals = [r[key] for r in rs if key in r]
        return sum(vals) / len(vals) if vals else float("nan")
    return (mean(rows[:k], "student/judge_reward"), mean(rows[-k:], "student/judge_reward"),
            mean(rows[:k], "student/true_solve_rate"), mean(rows[-k:], "student/true_solve_rate"))


def _metric_means(d: Path) -> dict:
    sums, counts = {}, {}
    for line in (d / "metrics.jsonl").read_text().splitlines():
        for k, v in json.loads(line).items():
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def plot_grid(out: Path, variants: list[str], seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for v in variants:
        curves = [_curve(out / v / f"seed{s}") for s in seeds]
        for ax, xi, label in ((axes[0], 0, "student samples"), (axes[1], 1, "total FLOPs (student + tutor)")):
            n = min(len(c) for c in curves)
            xs = [sum(c[i][xi] for c in curves) / len(curves) for i in range(n)]
            ys = [[c[i][2] for c in curves] for i in range(n)]
            m = [_mean_se(y)[0] for y in ys]
            se = [_mean_se(y)[1] for y in ys]
            line, = ax.plot(xs, m, marker="o", ms=3, label=v)
            ax.fill_between(xs, [a - b for a, b in zip(m, se)], [a + b for a, b in zip(m, se)],
                            color=line.get_color(), alpha=0.15)
            ax.set_xlabel(label)
    axes[0].set_ylabel("held-out solve rate (no hints)")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "solve_rate.png", dpi=100)
    plt.close(fig)


def plot_proxy_truth(out: Path, variants: list[str], seeds: list[int], bins: int = 20) -> None:
    """Judge-paid cells: the training judge reward (the proxy, solid) and the verifier's solve rate
    (the truth, dashed) against total FLOPs, mean over seeds in `bins` equal FLOP bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for v in variants:
        rows = [[r for r in (json.loads(x) for x in (out / v / f"seed{s}" / "metrics.jsonl").read_text().splitlines())
                 if "student/true_solve_rate" in r] for s in seeds]
        if any(rows):
            series[v] = rows
    if not series:
        return
    top = max(r["flops/total"] for rows in series.values() for rs in rows for r in rs)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for v, rows in series.items():
        color = None
        for key, style in (("student/judge_reward", "-"), ("student/true_solve_rate", "--")):
            xs, ys = [], []
            for b in range(bins):
                lo, hi = top * b / bins, top * (b + 1) / bins
                vals = [r[key] for rs in rows for r in rs if lo <= r["flops/total"] < hi and key in r]
                if vals:
                    xs.append((lo + hi) / 2)
                    ys.append(sum(vals) / len(vals))
            if ys:
                line, = ax.plot(xs, ys, style, color=color, label=f"{v} {'judge reward' if style == '-' else 'true solve'}")
                color = line.get_color()
    ax.set_xlabel("total FLOPs (student + tutor)")
    ax.set_ylabel("training attempts")
    ax.set_title("proxy (judge reward, solid) vs truth (verifier, dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "proxy_truth.png", dpi=100)
    plt.close(fig)
