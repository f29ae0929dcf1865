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

from common import args, setup, table

from selfplay.curriculum import Curriculum
from selfplay.domains.countdown import solve
from selfplay.evaluate import evaluate, heldout_tasks
from selfplay.generator import TorchBackend
from selfplay.prompts import Prompts
from selfplay.trainer import Row, Trainer


def solution_rows(pol, prompts: Prompts, curriculum: Curriculum, n: int) -> list[Row]:
    """n fresh tasks, each with the solver's solution as the whole completion (NLL on every token)."""
    rows = []
    while len(rows) < n:
        t = curriculum.fresh()
        expr = solve(t.numbers, t.target, False).expr
        if expr is None:
            continue
        ids = pol.tokenizer(expr, add_special_tokens=False)["input_ids"] + [pol.eos_id]
        prompt = pol.encode(prompts.render("attempt", numbers=t.numbers, target=t.target, hint=None))
        rows.append(Row(prompt, ids, 0.0, [0.0] * len(ids), len(ids), hindsight=True))
    return rows


def main():
    a = args(lambda p: (p.add_argument("--steps", type=int, default=600), p.add_argument("--batch", type=int, default=64),
                        p.add_argument("--eval-every", type=int, default=150)))
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
        rows = solution_rows(pol, prompts, curriculum, a.batch)
        tokens += sum(len(r.prompt_ids) + len(r.completion_ids) for r in rows)
        trainer.step("student", rows, cfg.generation.max_new_tokens)
        if step % a.eval_every == 0:
            point(step)
    table(f"oracle SFT: LoRA on the solver's solutions of fresh tasks ({a.threads} threads, batch {a.batch})",
          ["steps", "examples", "train FLOPs", "held-out sampled", "non-flat", "greedy", "wall s"], out)


if __name__ == "__main__":
    main()
