"""Compute accounting, for comparisons at equal compute (tutor included).

Generation costs 2·N FLOPs per token (prompt and completion), training 6·N per token of every row
in the update and epoch, the KL reference forward 2·N per trained token, with N the base's
parameter count. A frozen role costs no training FLOPs. A run stops at `iterations`,
`max_student_samples` or `max_total_flops`, whichever comes first (`budget_share`).
"""

from __future__ import annotations

from selfplay.config import RunConfig


def budget_share(cfg: RunConfig, iterations: int, student_samples: float, total_flops: float) -> float:
    """The share of a run's budget spent: the largest of iterations, student samples and model FLOPs
    against their limits (what ends the run ends the hint schedule too; a grid reads its cells' by it)."""
    shares = [iterations / cfg.iterations]
    if cfg.max_student_samples:
        shares.append(student_samples / cfg.max_student_samples)
    if cfg.max_total_flops:
        shares.append(total_flops / cfg.max_total_flops)
    return min(1.0, max(shares))


def count_tokens(turns: list[dict], rows: dict, epochs: int, ref: dict[str, bool]) -> dict[str, int]:
    """One iteration's samples and tokens per role, for the FLOP estimate: generation (prompt +
    completion of every sampled turn), training (every token of every trained row, once per epoch:
    forward + backward) and the KL reference forward (once per trained token, if the role's KL is on).
    `rows` holds only the rows really trained (none for a frozen tutor)."""
    out = {}
    for role in ("student", "tutor"):
        mine = [t for t in turns if t["role"] == role]
        trained = sum(len(r.prompt_ids) + len(r.completion_ids) for r in rows[role])
        out[f"samples/{role}"] = len(mine)
        out[f"tokens/{role}_gen"] = sum(t["prompt_tokens"] + t["completion_tokens"] for t in mine)
        out[f"tokens/{role}_train"] = trained * epochs
        out[f"tokens/{role}_ref"] = trained if ref[role] else 0
    return out


def flops(n_params: int, totals: dict) -> dict[str, float]:
    """2·N per forward token (generation, KL reference), 6·N per trained token (forward + backward)."""
    out = {f"flops/{r}": 2 * n_params * (totals[f"tokens/{r}_gen"] + totals.get(f"tokens/{r}_ref", 0))
           + 6 * n_params * totals[f"tokens/{r}_train"] for r in ("student", "tutor")}
    out["flops/total"] = out["flops/student"] + out["flops/tutor"]
    return out
