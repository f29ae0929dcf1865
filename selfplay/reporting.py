"""Plumbing for people: progress bar, TensorBoard, metrics.jsonl, summary table, learning-curve PNG."""

from __future__ import annotations

import json
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from selfplay.config import RunConfig, config_warnings
from selfplay.metrics import COLLAPSE_WINDOW, FULL_HINT


def quiet_libraries() -> None:
    """No "Loading weights" bar on every model load, no library FutureWarnings (peft asks
    transformers for a deprecated attribute on every adapter load), no leaked-semaphore warning
    at exit: each process of a run calls it, the learner included, since a spawned process starts
    with the default filters."""
    import threading
    import warnings

    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    # tqdm's default lock is a multiprocessing semaphore that torch.compile's (hidden) progress bar
    # creates and nothing releases: "leaked semaphore objects" at exit. No bar here spans processes.
    tqdm.set_lock(threading.RLock())


def code_version() -> dict:
    """What code this process runs: the package version and, from a git checkout (an editable
    install), the last commit that changed the code (selfplay/, roles/, memory/, prompts/, pyproject.toml:
    a commit of results or configs alone leaves it, as a run's config is saved beside it) and
    whether those files differ from it (`dirty`). A grid's cells each record it: a cell started
    while the checkout was being edited imports the edited code."""
    try:
        out: dict = {"version": version("selfplay")}
    except PackageNotFoundError:
        out = {"version": "unknown"}
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():  # a wheel install (site-packages may sit inside another repo)
        return out
    try:
        git = ["git", "-C", str(root)]
        code = ["--", "selfplay", "roles", "memory", "prompts", "pyproject.toml"]
        head = subprocess.run([*git, "log", "-1", "--format=%H", *code], capture_output=True, text=True, timeout=30)
        status = subprocess.run([*git, "status", "--porcelain", *code], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no git on the machine
        return out
    if head.returncode == 0 and head.stdout.strip():
        out |= {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    return out


PLAIN_KEYS = ("student/solve_rate", "student/hinted_solve_rate", "tutor/hint_reward", "tutor/mutate_valid_rate",
              "time/samples_per_s", "time/iteration_s")


class Progress:
    """A rich progress bar on a terminal; elsewhere (a batch job, a pipe, `logging.progress: false`)
    one plain line every `logging.log_every` iterations with the key metrics and throughput."""

    def __init__(self, cfg: RunConfig, start: int, console: Console | None, start_share: float = 0.0):
        self.console = console or Console(stderr=True)
        self.enabled = cfg.logging.progress and self.console.is_terminal
        self.every, self.total, self.start = cfg.logging.log_every, cfg.iterations, start
        self.start_share = start_share  # budget already spent when this process started (resume)
        self.t0 = time.perf_counter()
        self.bar = RichProgress(TextColumn("[bold]selfplay"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=self.console, disable=not self.enabled)
        self.task = self.bar.add_task("run", total=cfg.iterations, completed=start, info="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *a):
        self.bar.__exit__(*a)

    def update(self, it: int, m: dict, share: float | None = None) -> None:
        """`share`: the part of the run's budget spent so far (iterations, samples or FLOPs)."""
        if self.enabled:
            info = (f"solve {m.get('student/solve_rate', 0):.3f} hint {m.get('tutor/hint_reward', float('nan')):.2f} "
                    f"{m.get('time/iteration_s', 0):.2f}s/it")
            self.bar.update(self.task, completed=it, info=info)
        elif self.every and (it % self.every == 0 or it == self.total):
            share = it / self.total if share is None else share
            self.console.print(plain_line(it, self.total, m, time.perf_counter() - self.t0, share, self.start_share),
                               highlight=False, soft_wrap=True)


def plain_line(it: int, total: int, m: dict, elapsed: float, share: float, start_share: float = 0.0) -> str:
    """`iter 20/200 | student/solve_rate 0.031 | ... | budget 10% | elapsed 12s | eta 1m48s`"""
    eta = elapsed / max(share - start_share, 1e-9) * (1 - share)
    parts = [f"iter {it}/{total}"] + [f"{k} {m[k]:.3g}" for k in PLAIN_KEYS if k in m]
    return " | ".join(parts + [f"budget {share:.0%}", f"elapsed {_dur(elapsed)}", f"eta {_dur(eta)}"])


def _dur(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"


class RunLogger:
    """metrics.jsonl and TensorBoard. On resume from iteration k, both forget what came after k
    (those iterations are replayed): the JSONL is rewritten without them and TensorBoard purges
    them (`purge_step`), so no iteration is logged twice. It prints the config's warnings once at
    the start, and once, as it happens, a learned tutor's collapse to whole-solution hints
    (selfplay/metrics.py: hint_collapse)."""

    def __init__(self, out: Path, cfg: RunConfig, console: Console | None, resume_from: int | None = None):
        self.out, self.cfg = out, cfg
        self.console = console or Console(stderr=True)
        for w in config_warnings(cfg):
            self.console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
        path = out / "metrics.jsonl"
        if resume_from is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("iteration", 0) <= resume_from]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        self.tb = None
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_from + 1 if resume_from is not None else None
            self.tb = SummaryWriter(str(out / "tb"), purge_step=purge)
        self.jsonl = open(path, "a")
        self.full_hints = 0  # consecutive hinted iterations whose hints were the whole solution

    def log(self, it: int, m: dict) -> None:
        self.jsonl.write(json.dumps({"iteration": it, **m}) + "\n")
        self.jsonl.flush()
        if "tutor/hint_revealed" in m:
            self.full_hints = self.full_hints + 1 if m["tutor/hint_revealed"] >= FULL_HINT else 0
            if self.full_hints == COLLAPSE_WINDOW:
                self.console.print(f"[yellow]warning:[/yellow] iteration {it}: the tutor's hints have been the whole "
                                   f"solution for {COLLAPSE_WINDOW} iterations (tutor/hint_revealed >= {FULL_HINT}): "
                                   "they pay 0 and, without trainer.tutor_kl_coef, the tutor no longer learns",
                                   highlight=False)
        if self.tb:
            for k, v in m.items():
                self.tb.add_scalar(k, v, it)

    def log_eval(self, it: int, ev: dict, tag: str) -> None:
        self.log(it, {f"eval/solve_rate": ev["solve_rate"], "eval/greedy_solve_rate": ev["greedy_solve_rate"],
                      "eval/tag": {"before": 0, "eval": 1, "after": 2}[tag]})

    def finish(self, summary: dict) -> None:
        self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.cfg.logging.plot:
            plot_run(self.out, (summary.get("goodhart") or {}).get("iteration"))
        self.console.print(summary_table(summary))


def summary_table(s: dict) -> Table:
    t = Table(title=f"held-out, no hints ({s['before']['n_tasks']} tasks, {s['before']['samples']} samples each)")
    for c in ("", "before", "after"):
        t.add_column(c)
    b, a = s["before"], s["after"]
    t.add_row("sampled solve rate", f"{b['solve_rate']:.3f} ± {b['solve_rate_se']:.3f}",
              f"{a['solve_rate']:.3f} ± {a['solve_rate_se']:.3f}")
    t.add_row("greedy solve rate", f"{b['greedy_solve_rate']:.3f}", f"{a['greedy_solve_rate']:.3f}")
    for r in ("wrong_value", "bad_arithmetic", "bad_numbers", "unparseable"):
        t.add_row(f"  {r}", f"{b['reasons'].get(r, 0):.3f}", f"{a['reasons'].get(r, 0):.3f}")
    if "judge_accuracy" in a:
        def judge(e):
            return (f"{e.get('judge_balanced_accuracy', float('nan')):.3f} / {e.get('judge_precision', float('nan')):.2f}"
                    f" / {e.get('judge_recall', float('nan')):.2f}")
        t.add_row("judge balanced acc / precision / recall", judge(b), judge(a))
    if s.get("goodhart"):
        g = s["goodhart"]
        t.add_row("judge reward vs truth (training)", "",
                  f"parted at iteration {g['iteration']}" if g["iteration"] else "never parted")
    if "hint_collapse" in s:
        t.add_row("tutor's hints the whole solution (training)", "",
                  f"from iteration {s['hint_collapse']}" if s["hint_collapse"] else "never")
    imp = s["improvement"]
    t.add_row("paired Δ sampled", "", f"{imp['delta']:+.3f} ± {imp['delta_se']:.3f} (z = {imp['z']:.1f})")
    t.add_row("iterations / student samples", "", f"{s['iterations']} / {s['totals']['samples/student']}")
    return t


def read_metrics(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def plot_run(out: Path, parted: int | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(out) if "student/solve_rate" in r]
    # solve_rate is the verifier's (the truth); judge_reward is the proxy when the judge pays
    panels = {"student": ("student/solve_rate", "student/judge_reward", "student/hinted_solve_rate",
                          "student/bad_arithmetic"),
              "tutor (rewards)": ("tutor/hint_reward", "tutor/mutate_reward", "tutor/judge_reward",
                                  "tutor/mutate_valid_rate")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (title, keys) in zip(axes, panels.items()):
        for k in keys:
            xs = [r["iteration"] for r in rows if k in r]
            ys = [r[k] for r in rows if k in r]
            if not ys:
                continue
            w = max(1, len(ys) // 30)  # moving average: per-iteration values are noisy
            sm = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]
            ax.plot(xs, sm, label=k)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    ev = [r for r in read_metrics(out) if "eval/solve_rate" in r]
    if ev:
        axes[0].plot([r["iteration"] for r in ev], [r["eval/solve_rate"] for r in ev], "ko--",
                     label="eval/solve_rate (held-out, no hints)")
    if parted:
        axes[0].axvline(parted, color="r", ls=":", label=f"judge reward parts from truth (it {parted})")
    axes[0].set_ylim(0, 1)
    axes[1].set_ylim(-1.05, 1.05)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    p = out / "learning_curves.png"
    fig.tight_layout()
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p
