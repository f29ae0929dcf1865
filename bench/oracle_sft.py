"""The imitation ceiling: how far can the student adapter get by supervised training on the
solver's solutions alone (no RL, no sampling, every example a verified solution of a fresh task)?
An upper reference for any tutor whose hints are prefixes of those solutions. LoRA SFT with the
run's optimizer and adapter (the trainer's NLL path), batches of fresh tasks from the training
distribution, the held-out evaluation of `selfplay run` every `--eval-every` steps; prints a table
of steps, examples, training FLOPs (6·N per token) and held-out solve rates.

    python bench/oracle_sft.py --steps 600 --batch 64 --eval-every 150 --threads 2
"""

from __future__ import annotations

import time

import torch
from common import args, setup, table

from selfplay.curriculum import Curriculum
from selfplay.domains.countdown import solve, verify
from selfplay.domains.countdown.solver import to_expr
from selfplay.evaluate import evaluate, heldout_tasks
from selfplay.generator import TorchBackend
from selfplay.policy import make_batch
from selfplay.prompts import Prompts
from selfplay.trainer import Row, Trainer


def solution_rows(pol, prompts: Prompts, curriculum: Curriculum, n: int, pick: str, limit: int) -> tuple[list[Row], int]:
    """n fresh tasks, each with one solution as the whole completion (NLL on every token), and the
    tokens scored to choose it. `pick`: `solver` = the solver's solution (a flat +/- one when it
    exists); `likely` = of up to `limit` distinct solutions, the one the student's adapter gives the
    highest log-probability (the most on-policy demonstration)."""
    prompts_ids, cands = [], []  # per task: prompt ids, candidate completions (ids + EOS)
    while len(cands) < n:
        t = curriculum.fresh()
        exprs = solutions(t.numbers, t.target, limit) if pick == "likely" else [solve(t.numbers, t.target, False).expr]
        if not exprs or exprs[0] is None:
            continue
        prompts_ids.append(pol.encode(prompts.render("attempt", numbers=t.numbers, target=t.target, hint=None)))
        cands.append([pol.tokenizer(e, add_special_tokens=False)["input_ids"] + [pol.eos_id] for e in exprs])
    chosen, scored = [cs[0] for cs in cands], 0
    if pick == "likely":
        flat = [(p, c) for p, cs in zip(prompts_ids, cands) for c in cs]
        with torch.no_grad():
            b = make_batch([p for p, _ in flat], [c for _, c in flat], pol.pad_id)
            lp = (pol.logprobs(b, "student") * b.completion_mask).sum(1).tolist()  # (tasks x candidates,)
        scored = sum(len(p) + len(c) for p, c in flat)
        k = 0
        for i, cs in enumerate(cands):
            chosen[i] = cs[max(range(len(cs)), key=lambda j: lp[k + j])]
            k += len(cs)
    return [Row(p, c, 0.0, [0.0] * len(c), len(c), hindsight=True) for p, c in zip(prompts_ids, chosen)], scored


def solutions(numbers: list[int], target: int, limit: int) -> list[str]:
    """Up to `limit` distinct solution texts: every tree, both operand orders, depth first."""
    out: dict[str, None] = {}

    def go(pool):
        if len(pool) == 1:
            if abs(pool[0][0] - target) < 1e-6:
                out.setdefault(to_expr(pool[0][1]), None)
            return
        for i, (a, ea) in enumerate(pool):
            for j, (b, eb) in enumerate(pool):
                if i == j:
                    continue
                rest = [p for k, p in enumerate(pool) if k not in (i, j)]
                for v, e in ((a + b, ("+", ea, eb)), (a * b, ("*", ea, eb)), (a - b, ("-", ea, eb)),
                             (a / b if b else None, ("/", ea, eb))):
                    if v is not None:
                        go(rest + [(v, e)])
                    if len(out) >= limit:
                        return

    go([(float(n), n) for n in numbers])
    return [s for s in out if verify(s, numbers, target).solved]  # floats search, the verifier certifies


def main():
    a = args(lambda p: (p.add_argument("--steps", type=int, default=600), p.add_argument("--batch", type=int, default=64),
                        p.add_argument("--eval-every", type=int, default=150),
                        p.add_argument("--pick", choices=("solver", "likely"), default="solver"),
                        p.add_argument("--candidates", type=int, default=16)))
    cfg, pol = setup(a.threads, ["trainer.hindsight_nll=1.0", "curriculum.fresh_fraction=1.0",
                                 "curriculum.replay_fraction=0.0", *a.set])
    prompts, heldout = Prompts(cfg.prompts), heldout_tasks(cfg.eval)
    curriculum = Curriculum(cfg, {t.key for t in heldout})
    trainer, backend = Trainer(pol, cfg), TorchBackend(pol, cfg.generation.temperature, cfg.generation.top_k, cfg.seed)
    out, tokens, t0 = [], 0, time.perf_counter()

    def point(step: int):
        backend.sync_adapters(step)  # the sampler decodes from merged copies of the adapters
        ev = evaluate(pol, backend, prompts, heldout, cfg)
        out.append([step, step * a.batch, f"{6 * pol.n_params * tokens:.2e}", f"{ev['solve_rate']:.3f} ± {ev['solve_rate_se']:.3f}",
                    f"{ev['solve_rate_nonflat']:.3f}", f"{ev['greedy_solve_rate']:.3f}", f"{time.perf_counter() - t0:.0f}"])
        print(*out[-1], flush=True)

    point(0)
    for step in range(1, a.steps + 1):
        rows, scored = solution_rows(pol, prompts, curriculum, a.batch, a.pick, a.candidates)
        tokens += sum(len(r.prompt_ids) + len(r.completion_ids) for r in rows) + scored / 3  # a forward: 2N, not 6N
        trainer.step("student", rows, cfg.generation.max_new_tokens)
        if step % a.eval_every == 0:
            point(step)
    table(f"oracle SFT: LoRA on solutions of fresh tasks (pick {a.pick}, {a.threads} threads, batch {a.batch})",
          ["steps", "examples", "train FLOPs", "held-out sampled", "non-flat", "greedy", "wall s"], out)


if __name__ == "__main__":
    main()
