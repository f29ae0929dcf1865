"""Trainer: one AdamW per adapter, one clipped-ratio GRPO update per role per iteration.

Input rows come with their advantages already computed (per role x turn-kind group, see grpo.py) and
the sampler's behaviour log-probs, which are the ratio's denominator (`old_logprobs`). A row whose
completion is all forced tokens has no policy-gradient token and is not counted in the
policy-gradient normalisers (the loop sends the solved attempts of a flat hinted group as one such
row: the hint only, `weight` = how many attempts it stands for). Hindsight rows (a failed attempt
with a relabelled prompt whose target is the value it reached; with
`trainer.hindsight_solved_hinted`, also a hinted attempt that solved, under the plain task prompt)
carry no policy gradient: their whole completion gets λ_H · mean NLL over all such tokens
(`trainer.hindsight_nll`). A KL-only row (`pg=False`: a tutor turn of a zero-variance group, kept
when `trainer.tutor_kl_coef` > 0) is in the KL term only, so it pulls towards the prior without
diluting the policy gradient's normalisers. The KL coefficient is per role: `kl_coef` (student),
`tutor_kl_coef` (tutor). The NLL terms score their targets under the tempered distribution without
the top-k filter (they were not sampled, and outside the top k their sampling log-prob is -inf); the
ratio uses the filtered one. Rows are sorted into length buckets (`micro_batches`), so a few long
answers do not pad every row. A non-finite loss or gradient norm skips that role's update (counted
in `trainer/skipped`), so a bad batch never corrupts an adapter.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from selfplay import distributed as dist
from selfplay import grpo
from selfplay.config import RunConfig
from selfplay.functional import require_compiler
from selfplay.policy import Policy, make_batch


@dataclass
class Row:
    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    old_logprobs: list[float] | None = None  # behaviour log-probs of the sampler; None = score now
    forced: int = 0  # leading completion tokens that were teacher-forced (a hint), not sampled
    nll: bool = False  # train the forced tokens with the NLL term (the hinted continuation solved)
    hindsight: bool = False  # a relabelled attempt: every completion token gets the hindsight NLL term
    weight: int = 1  # identical rows merged into one: its NLL term counts this many times
    pg: bool = True  # False: no policy gradient (a zero-variance group), only the KL term sees it


def _old_logprobs(rows: list[Row], C: int) -> torch.Tensor | None:
    """(B, C) behaviour log-probs right-padded with 0, or None if any row lacks them."""
    if any(r.old_logprobs is None for r in rows):
        return None
    return torch.tensor([[*r.old_logprobs] + [0.0] * (C - len(r.old_logprobs)) for r in rows])


def micro_batches(rows: list[Row], size: int, buckets: bool) -> list[list[Row]]:
    """Micro-batches of at most `size` rows. With `buckets`, rows are sorted by completion length
    and the sorted list is cut once more where that saves at least a quarter of the padded
    completion tokens (rows x longest completion per micro-batch)."""
    if not buckets:
        return [rows[i: i + size] for i in range(0, len(rows), size)]
    rows = sorted(rows, key=lambda r: len(r.completion_ids))
    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i: i + size]
        lens = [len(r.completion_ids) for r in chunk]
        padded = len(chunk) * lens[-1]
        cost, k = min((k * lens[k - 1] + (len(chunk) - k) * lens[-1], k) for k in range(1, len(chunk) + 1))
        out += [chunk[:k], chunk[k:]] if k < len(chunk) and cost <= 0.75 * padded else [chunk]
    return out


class Trainer:
    def __init__(self, policy: Policy, cfg: RunConfig):
        self.policy, self.cfg = policy, cfg
        t = cfg.trainer
        if t.compile:
            require_compiler(cfg.model.device, "trainer.compile")
        # fused: one kernel for all ~56 LoRA tensors (4.4 -> 1.0 ms per step on 1 CPU thread)
        fused = torch.device(cfg.model.device).type in ("cpu", "cuda")
        self.opt = {"student": torch.optim.AdamW(policy.adapter_params("student"), lr=t.lr, betas=t.betas,
                                                 weight_decay=t.weight_decay, fused=fused)}
        self.opt["tutor"] = self.opt["student"] if cfg.lora.shared else torch.optim.AdamW(
            policy.adapter_params("tutor"), lr=t.tutor_lr, betas=t.betas, weight_decay=t.weight_decay, fused=fused)
        self.versions = {"student": 0, "tutor": 0}
        self.skipped = 0

    def step(self, role: str, rows: list[Row], max_tokens: int) -> dict[str, float]:
        """One update of `role`'s adapter on `rows` (micro-batched, gradients accumulated)."""
        t, pol = self.cfg.trainer, self.policy
        # the normalisers count the rows of EVERY rank (torchrun): the loss of each rank's rows is
        # its share of the global loss, and the summed gradients are one process's on all rows
        kl_coef = t.kl_coef if role == "student" else t.tutor_kl_coef
        n_rows, n_tokens, n_nll, n_hs, n_kl = (int(x) for x in dist.all_sum([
            sum(len(r.completion_ids) > r.forced for r in rows if r.pg),  # rows with a sampled token
            sum(len(r.completion_ids) - r.forced for r in rows if r.pg),  # sampled tokens: the PG normaliser
            sum(r.forced * r.weight for r in rows if r.nll),
            sum(len(r.completion_ids) for r in rows if r.hindsight),
            sum(len(r.completion_ids) - r.forced for r in rows) if kl_coef > 0 else 0]))  # the KL's
        if not (n_rows or n_hs or (n_nll and t.hint_nll > 0) or n_kl):
            return {}
        t0 = time.perf_counter()
        pol.use(role)
        pol.train_mode(role, True)
        params = pol.adapter_params(role)
        opt = self.opt[role]
        batches = micro_batches(rows, t.micro_batch, t.length_buckets)
        built = [make_batch([r.prompt_ids for r in b], [r.completion_ids for r in b], pol.pad_id) for b in batches]
        old = [_old_logprobs(rs, b.C) for rs, b in zip(batches, built)]
        stats = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0}
        for epoch in range(t.epochs):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for k, (b, rs) in enumerate(zip(built, batches)):
                adv = torch.tensor([r.advantage for r in rs], device=pol.cfg.model.device)
                lp, lp_nll = pol.train_logprobs(b, role)  # (b, C) each: the ratio's, the NLL terms
                if old[k] is None:
                    old[k] = lp.detach()
                old[k] = old[k].to(lp.device)
                sampled, nll_mask = grpo.split_masks(b.completion_mask.to(lp.device),
                                                     torch.tensor([r.forced for r in rs], device=lp.device),
                                                     torch.tensor([r.nll * r.weight for r in rs], device=lp.device))
                mask = sampled * torch.tensor([r.pg for r in rs], device=lp.device)[:, None]  # (b, C) PG tokens
                per_tok, st = grpo.per_token_loss(lp, old[k], adv, t.clip_low, t.clip_high)
                loss = grpo.aggregate(per_tok, mask, t.aggregation, n_rows, n_tokens, max_tokens)
                if n_kl:
                    ref = pol.ref_logprobs(b)
                    pol.use(role)
                    kl_term, kl = grpo.kl_penalty(lp, ref, sampled, n_kl)
                    loss = loss + kl_coef * kl_term
                if n_nll and t.hint_nll > 0:
                    loss = loss + t.hint_nll * grpo.nll(lp_nll, nll_mask, n_nll)
                if n_hs:
                    hs_mask = b.completion_mask.to(lp.device) * torch.tensor([r.hindsight for r in rs], device=lp.device)[:, None]
                    loss = loss + t.hindsight_nll * grpo.nll(lp_nll, hs_mask, n_hs)
                loss.backward()
                total += loss.item()
                if epoch == t.epochs - 1:
                    stats["clip_frac"] += float((st["clip_frac"] * mask).sum()) / max(n_tokens, 1)
                    if n_kl:
                        stats["kl"] += kl_term.item()
            dist.all_reduce_grads(params)
            total = dist.all_sum([total])[0]
            gnorm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            if not (math.isfinite(total) and math.isfinite(float(gnorm))):
                opt.zero_grad(set_to_none=True)
                self.skipped += 1
                pol.train_mode(role, False)
                return {f"{role}/skipped_update": 1.0, "trainer/skipped": float(self.skipped)}
            opt.step()
            stats["loss"] = total
            stats["grad_norm"] = float(gnorm)
        pol.train_mode(role, False)
        stats["clip_frac"], stats["kl"] = dist.all_sum([stats["clip_frac"], stats["kl"]])
        self.versions[role] += 1
        dt = time.perf_counter() - t0
        out = {f"{role}/{k}": v for k, v in stats.items()}
        out[f"trainer/{role}_rows_per_s"] = n_rows / dt
        out[f"trainer/{role}_seconds"] = dt
        return out

    def warm_up(self, role: str) -> None:
        """Compile `role`'s training forward and backward (`trainer.compile`) on a two-row batch whose
        gradients are dropped: no optimizer step, the adapter unchanged. The learner runs it while
        the main process evaluates the base and samples the first rollouts, instead of inside the
        first update."""
        pol, e = self.policy, self.policy.eos_id
        b = make_batch([[e] * 3, [e] * 2], [[e] * 2, [e] * 3], pol.pad_id)  # no size of 1: the updates' graph
        pol.train_mode(role, True)
        pol.train_logprobs(b, role)[0].sum().backward()
        pol.train_mode(role, False)
        self.opt[role].zero_grad(set_to_none=True)

    def state(self) -> dict:
        return {"opt": {r: o.state_dict() for r, o in self.opt.items()}, "versions": dict(self.versions),
                "skipped": self.skipped}

    def load(self, state: dict) -> None:
        for r, o in self.opt.items():
            o.load_state_dict(state["opt"][r])
        self.versions.update(state["versions"])  # in place: the episode graph holds this dict
        self.skipped = state["skipped"]
