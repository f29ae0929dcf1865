"""GRPO math as pure functions.

Variant (defaults in `TrainerCfg`):
- Advantages are computed per group, and groups never mix roles or turn kinds: a group is the G
  attempts on one prompt (student), the H hints for one failed group (or every hint of the
  iteration, `trainer.hint_baseline: batch`: REINFORCE with the batch mean, for H = 1), the M
  children of one parent, or the votes on one attempt (tutor). A_i = (r_i - mean_g) / (std_g + eps) with the sample
  (unbiased, n-1) std as in TRL; `scale_std=False` gives Dr.GRPO's A_i = r_i - mean_g.
- Groups whose rewards are all equal (max - min <= 1e-9, so float noise in a mean does not count
  as signal) carry none and are dropped (`drop_zero_variance`); singleton groups are always
  dropped (no baseline), whatever the flag.
- Objective: PPO clipped ratio per token, with asymmetric clip (DAPO clip-higher):
  L_t = -min(rho_t A, clip(rho_t, 1 - clip_low, 1 + clip_high) A), rho_t = exp(logp_t - old_logp_t).
  old_logp are the behaviour log-probs the sampler drew the tokens with, and logp is scored under
  the same sampling distribution (temperature and top-k), so rho = 1 up to float rounding at
  epoch 1 and the clip matters with `epochs > 1` or a stale sampler.
- Optional KL to the reference (base with adapters disabled), k3 estimator per token:
  KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1, added as kl_coef · (sum of KL_t over the
  sampled tokens of every row) / (their count): a token mean of its own, whatever the
  aggregation of the policy term (`kl_penalty`). Its rows may include KL-only rows that carry no
  policy gradient (the tutor's zero-variance groups, `trainer.tutor_kl_coef`), so a collapsed
  policy, whose groups are all equal and would be dropped, still feels the pull to its prior.
- Teacher-forced hint tokens (a hint placed at the start of the student's completion) are not the
  policy's samples: no ratio, no advantage. They get an NLL term instead, on rows whose sampled
  continuation solved the task: L = L_pg(sampled tokens) + λ · mean NLL(forced tokens of those
  rows) (`trainer.hint_nll`; UFT/BREAD's supervised term on the given prefix). Hindsight rows
  (HER-style relabelling of failed attempts, built in loop.py) add λ_H · mean NLL over their
  tokens, normalised apart (`trainer.hindsight_nll`).
- Judge votes are class-balanced (`trainer.judge_class_balance`): after the per-group
  normalisation, each judge turn's advantage is scaled by n / (K · n_c), n_c the judge turns of this
  iteration on attempts of its true class c (K classes present). Most attempts are wrong, so
  without it the gradient mostly says "answer N", and a constant "N" judge looked 92% accurate.
- Aggregation: "token" = sum over all completion tokens / their count (DAPO); "sequence" = mean
  over tokens per sequence, then mean over sequences (original GRPO); "dr_grpo" = sum over tokens /
  (rows * max_new_tokens) (Dr.GRPO's constant normaliser, no length bias).
  `aggregate` takes the full batch's counts so micro-batches sum to the full-batch loss.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Sequence

import torch


def group_advantages(rewards: Sequence[float], groups: Sequence[Hashable], scale_std: bool = True,
                     drop_zero_variance: bool = True, eps: float = 1e-6) -> tuple[list[float], list[bool]]:
    """Per-group normalised advantages and a keep flag: False for singleton groups, and for groups
    whose rewards are all equal when `drop_zero_variance`."""
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    adv, keep = [0.0] * len(rewards), [False] * len(rewards)
    for idx in members.values():
        r = torch.tensor([float(rewards[i]) for i in idx], dtype=torch.float64)
        if len(idx) < 2:
            continue
        flat = float(r.max() - r.min()) <= 1e-9
        a = torch.zeros_like(r) if flat else r - r.mean()
        if scale_std and not flat:
            a = a / (r.std() + eps)  # unbiased std
        for i, v in zip(idx, a.tolist()):
            adv[i] = v
            keep[i] = not (flat and drop_zero_variance)
    return adv, keep


def class_balanced(advantages: Sequence[float], classes: Sequence[Hashable | None]) -> list[float]:
    """Scale advantage i by n / (K · n_c) where c = classes[i], n and n_c count the rows with a
    class (None = no class: left as is) and K is the number of classes present, so each class
    carries the same total weight."""
    counts: dict[Hashable, int] = defaultdict(int)
    for c in classes:
        if c is not None:
            counts[c] += 1
    n, k = sum(counts.values()), len(counts)
    return [a if c is None else a * n / (k * counts[c]) for a, c in zip(advantages, classes)]


def per_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                   clip_low: float, clip_high: float) -> tuple[torch.Tensor, dict]:
    """Clipped-ratio policy loss per token. logprobs/old: (B, C); advantages: (B,). Returns (B, C)."""
    ratio = torch.exp(logprobs - old_logprobs)  # (B, C)
    A = advantages[:, None]  # (B, 1)
    unclipped = ratio * A
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * A
    loss = -torch.minimum(unclipped, clipped)  # (B, C)
    return loss, {"clip_frac": (clipped < unclipped).float()}  # the clipped term is the active one


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, n_tokens: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of k3 KL_t over the masked tokens / `n_tokens`, the (B, C) KL_t). logprobs/ref/mask: (B, C);
    n_tokens: the full batch's count of such tokens, so micro-batches sum to the full-batch term."""
    d = ref_logprobs - logprobs
    kl = torch.exp(d) - d - 1  # k3: >= 0, unbiased for KL(pi || ref) on pi's samples
    return (kl * mask).sum() / max(n_tokens, 1), kl


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, n_rows: int, n_tokens: int,
              max_tokens: int) -> torch.Tensor:
    """Reduce (B, C) per-token losses of a micro-batch to its share of the full-batch loss.

    n_rows / n_tokens: rows and completion tokens of the FULL batch; max_tokens: the generation cap.
    """
    masked = per_token * mask
    if how == "token":
        return masked.sum() / max(n_tokens, 1)
    if how == "sequence":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / max(n_rows, 1)
    if how == "dr_grpo":
        return masked.sum() / (max(n_rows, 1) * max_tokens)
    raise ValueError(f"unknown aggregation {how!r}")


def split_masks(completion_mask: torch.Tensor, forced: torch.Tensor, nll_rows: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) masks of the sampled tokens (policy-gradient) and of the teacher-forced tokens that
    get the NLL term. forced: (B,) leading forced tokens per row; nll_rows: (B,) each row's weight
    in the NLL term (0 = off; a bool works)."""
    cols = torch.arange(completion_mask.shape[1], device=completion_mask.device)[None, :]  # (1, C)
    is_forced = (cols < forced[:, None]).to(completion_mask.dtype)  # (B, C)
    return completion_mask * (1 - is_forced), completion_mask * is_forced * nll_rows[:, None].to(completion_mask.dtype)


def nll(logprobs: torch.Tensor, mask: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Sum of -logprob over the masked tokens / `n_tokens` (the full batch's count of such tokens)."""
    return -(logprobs * mask).sum() / max(n_tokens, 1)
