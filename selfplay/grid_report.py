"""The tables and plots of a finished ablation grid (selfplay/ablate.py runs the cells).

results_table: mean ± SE over seeds of every cell's before/after evaluation, its eval curve
interpolated at the largest total-FLOPs budget every cell reached, the environment's solver time,
the tutor's and judge's training metrics (with the iteration, per seed, where the tutor's hints
collapsed to the whole solution), and a column per extra task file. Below it, each variant
minus the first one listed (the grid's reference), paired on the same held-out tasks within a seed
(the mean per-task difference ± its SE over tasks), then over seeds (the mean ± SE of the per-seed
differences): the comparison the README quotes. The last line names the code the cells ran.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from selfplay.evaluate import _mean_se
from selfplay.metrics import hint_collapse
from selfplay.reporting import read_metrics


def cell_summary(d: Path) -> dict | None:
    p = d / "summary.json"
    return json.loads(p.read_text()) if p.is_file() else None


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


def _collapses(dirs: list[Path]) -> str:
    """Per seed, where the tutor's hints collapsed to the whole solution (metrics.hint_collapse),
    from metrics.jsonl, so a grid run before the summary recorded it is read the same way."""
    rows = [read_metrics(d) for d in dirs]
    if not any("tutor/hint_revealed" in r for rs in rows for r in rs):
        return "–"
    return ", ".join(str(hint_collapse(rs) or "never") for rs in rows)


def _fmt(xs: list[float], digits: int = 3) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "–"
    m, se = _mean_se(xs)
    return f"{m:.{digits}f} ± {se:.{digits}f}"


def results_table(out: Path, variants: list[str], seeds: list[int], hard: bool, task_names: list[str] = ()) -> str:
    cells = {(v, s): out / v / f"seed{s}" for v in variants for s in seeds}
    sums = {k: cell_summary(d) for k, d in cells.items()}
    curves = {k: _curve(d) for k, d in cells.items()}
    f_star = min(s["flops"]["flops/total"] for s in sums.values())  # every cell reached this much compute
    head = ["variant", "sampled solve (before)", "sampled solve (after)", "non-flat solve (after)", "greedy solve (after)",
            f"solve @ {f_star:.2e} FLOPs", "student samples", "tutor samples", "student TFLOPs", "tutor TFLOPs",
            "solver s", "hinted solve rate", "hint revealed", "identical hint groups", "whole-solution hints from it", "judge balanced acc",
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
               _collapses([cells[v, s] for s in seeds]),
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
