"""The environment-compute curve: at the grid's fixed model-FLOPs budget, the student's held-out
solve rate (no hints) as the hint budget grows: 0 (plain GRPO), 1, 2 and 4 tutor hints per failed
group. Reads a finished `selfplay ablate --config configs/ablations/tutor.yaml` directory; prints
a table (mean ± SE over seeds, solver seconds) and writes a PNG.

    python bench/env_compute.py --grid runs/ablate-tutor [--png bench/results/env-compute.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import table

from selfplay.evaluate import _mean_se

CURVE = {0: "plain_grpo", 1: "tutor_1_hint", 2: "learned_tutor", 4: "tutor_4_hints"}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--grid", type=Path, required=True)
    p.add_argument("--png", type=Path, default=Path("bench/results/env-compute.png"))
    a = p.parse_args()
    points = []
    for h, variant in CURVE.items():
        sums = [json.loads(f.read_text()) for f in sorted((a.grid / variant).glob("seed*/summary.json"))]
        if not sums:
            continue
        after = [s["after"]["solve_rate"] for s in sums]
        nonflat = [s["after"]["solve_rate_nonflat"] for s in sums]
        flops = sum(s["flops"]["flops/total"] for s in sums) / len(sums)
        solver = sum(s.get("env", {}).get("solver_seconds", 0.0) for s in sums) / len(sums)
        calls = sum(s.get("env", {}).get("solver_calls", 0) for s in sums) / len(sums)
        points.append((h, variant, _mean_se(after), _mean_se(nonflat), flops, calls, solver, len(sums)))
    table(f"held-out solve rate vs hints per failed group, equal model FLOPs ({a.grid})",
          ["hints per failed group", "variant", "sampled solve", "non-flat solve", "model TFLOPs", "solver calls",
           "solver s", "seeds"],
          [[h, v, f"{m:.3f} ± {se:.3f}", f"{nm:.3f} ± {nse:.3f}", f"{fl / 1e12:.2f}", f"{c:.0f}", f"{s:.1f}", n]
           for h, v, (m, se), (nm, nse), fl, c, s, n in points])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [x[0] for x in points]
    ax.errorbar(xs, [x[2][0] for x in points], yerr=[x[2][1] for x in points], marker="o", capsize=3,
                label="held-out sampled solve (no hints)")
    ax.errorbar(xs, [x[3][0] for x in points], yerr=[x[3][1] for x in points], marker="s", capsize=3,
                label="on tasks no flat +/- solves")
    ax.set_xlabel("tutor hints per failed group (environment compute)")
    ax.set_ylabel("solve rate after training")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    a.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.png, dpi=100)
    print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
