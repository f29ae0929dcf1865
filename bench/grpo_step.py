"""Plain-GRPO iteration speed (tutor off): 16 prompts x 8 samples by default, the TRL comparison
setting. Prints seconds per iteration, samples/s and the split between rollout and update, plus a
stage table with the full tutor on, and the full tutor's iteration against plain GRPO's in every
round. `--trl` also times TRL's GRPOTrainer on the same model, batch and reward (solved 1, a
well-formed wrong answer `rewards.format_credit`; `pip install -e ".[bench]"`), alternating with
ours `--rounds` times in the same process; each side's number is the median step after warm-up,
and no ratio is printed without TRL. Each variant starts with the curriculum's task pool full, as
a run is after its first 125 iterations (the 20 timed ones would not get there, and the pool's
upkeep once cost ~30 ms an iteration that only real runs paid). Plain GRPO runs synchronous, with
`policy_lag 1`, and with `policy_lag 1` plus `trainer.compile` and `generation.compile`, as
configs/plain-grpo.yaml runs it (the one-time compiles fall in the warm-up and are not counted:
~20-50 s each on a machine's first use, 5-15 s from inductor's cache).

    python bench/grpo_step.py [--threads 2] [--iters 20] [--trl] [--rounds 3]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from common import args, peak_rss_mb, setup, table


def time_iterations(sets: list[str], threads: int, iters: int, extra: list[str] = ()):
    from selfplay.config import load_config
    from selfplay.loop import SelfPlay

    cfg = load_config(None, [f"model.threads={threads}", "curriculum.episodes_per_iter=16", *extra, *sets])
    with tempfile.TemporaryDirectory() as d:
        sp = SelfPlay(cfg, Path(d))
        for _ in range(cfg.curriculum.pool_size):  # a long run's steady state: the task pool full (2,000
            sp.curriculum.update(sp.curriculum.fresh(), 8, 0, 0)  # tasks after 125 iterations), so its upkeep is timed
        sp.iteration(1)  # warm-up; with policy_lag 1 the first update (and trainer.compile's compile)
        sp.iteration(2)  # is collected in the second iteration
        ms = [sp.iteration(i) for i in range(3, iters + 3)]
        sp.store.close()
        sp.close()
    return cfg, ms


def avg(ms, k):
    return sum(m.get(k, 0.0) for m in ms) / len(ms)


def trl_step(threads: int, iters: int, sets: list[str] = ()) -> float | None:
    try:
        import trl  # noqa: F401
    except ImportError:
        return None
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from roles.student import attempt_reward, extract_answer
    from selfplay.config import load_config
    from selfplay.domains.countdown import generate_tasks, verify
    from selfplay.policy import ensure_base
    from selfplay.tokenizer import load_tokenizer

    import torch

    torch.set_num_threads(threads)  # a policy_lag 1 run left this process at 1 thread (the learner had the other)
    cfg = load_config(None, list(sets))  # the same base (model.cache_dir) and device as ours
    path = ensure_base(cfg)
    tok = load_tokenizer(path)  # AutoTokenizer mis-tokenises the embedded base (selfplay/tokenizer.py)
    tasks = generate_tasks(16 * (iters + 2), 5)
    ds = Dataset.from_list([{"prompt": f"S:{' '.join(map(str, t.numbers))}>{t.target}|", "numbers": t.numbers,
                             "target": t.target} for t in tasks])

    def reward(completions, numbers, target, **_):  # ours: 1 solved, format credit for well-formed and wrong
        return [attempt_reward(verify(extract_answer(c), n, t), cfg.rewards.format_credit)
                for c, n, t in zip(completions, numbers, target)]

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=128, num_generations=8,
                      max_completion_length=cfg.generation.max_new_tokens, max_steps=iters + 1, logging_steps=1000,
                      learning_rate=1e-3, report_to=[], use_cpu=cfg.model.device == "cpu", save_strategy="no", beta=0.0,
                      steps_per_generation=1, gradient_checkpointing=False, lr_scheduler_type="constant",
                      temperature=1.0, bf16=False, fp16=False)  # fp32 like ours: TRL 1.16 defaults to bf16
                      # autocast, which on a CPU without bf16 matmuls made its step 10x slower (4.8 s)
    tr = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=reward, args=args, train_dataset=ds,
                     processing_class=tok, peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    from transformers import TrainerCallback

    class Steps(TrainerCallback):  # per-step wall time, to drop the warm-up step
        times: list[float] = []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    cb = Steps()
    tr.add_callback(cb)
    tr.train()
    return statistics.median(cb.times[1:])


def main():
    a = args(lambda p: (p.add_argument("--iters", type=int, default=20), p.add_argument("--trl", action="store_true"),
                        p.add_argument("--rounds", type=int, default=1)))
    setup(a.threads, a.set)  # builds the base if needed
    plain = ["graph.hint=false", "graph.mutate=false", "graph.judge=false", "trainer.train_tutor=false",
             "trainer.hindsight_nll=0"]  # plain GRPO: the default config relabels failures too
    # synchronous; the update overlapping the next rollout in a learner process; and that with the
    # trainer's layers and the sampler's decode steps compiled, as configs/plain-grpo.yaml runs it
    # (the compiles themselves happen in the warm-up)
    variants = {"policy_lag 0": ["trainer.policy_lag=0"], "policy_lag 1": ["trainer.policy_lag=1"],
                "policy_lag 1, compiled": ["trainer.policy_lag=1", "trainer.compile=true", "generation.compile=true"]}
    rows, ours, theirs, full, stages_ms = [], {v: [] for v in variants}, [], {0: [], 1: []}, None
    for r in range(a.rounds):  # alternate, so drift of the machine hits every side
        for name, sets in variants.items():
            _, ms = time_iterations(plain + sets, a.threads, a.iters, a.set)
            s = statistics.median(m["time/iteration_s"] for m in ms)
            ours[name].append(s)
            rows.append([f"selfplay plain GRPO, {name} (round {r + 1})", f"{s:.3f}", f"{128 / s:.0f}",
                         f"{avg(ms, 'time/rollout_s'):.3f}", f"{avg(ms, 'time/train_s'):.3f}",
                         f"{avg(ms, 'rollout/tokens_per_s'):,.0f}"])
        for lag in (0, 1):  # the full tutor (the default config) in the same round, at the same lags
            _, ms = time_iterations([f"trainer.policy_lag={lag}"], a.threads, a.iters, a.set)
            full[lag].append(statistics.median(m["time/iteration_s"] for m in ms))
            stages_ms = stages_ms or ms  # round 1, synchronous: the stages run in series
        trl_s = trl_step(a.threads, min(a.iters, 6), a.set) if a.trl else None
        if trl_s:
            theirs.append(trl_s)
            rows.append([f"TRL GRPOTrainer (round {r + 1})", f"{trl_s:.3f}", f"{128 / trl_s:.0f}", "", "", ""])
    ratio = ("speed-up vs TRL (medians): " + ", ".join(
        f"{name} {statistics.median(theirs) / statistics.median(t):.2f}x" for name, t in ours.items()) if theirs
        else "TRL not measured (pass --trl with the bench extra installed)")
    table(f"plain GRPO, 16 prompts x 8 samples, {a.threads} threads; {ratio}",
          ["trainer", "s/iteration", "samples/s", "rollout s", "update s (lag 1: wait)", "rollout tokens/s"], rows)

    tot = avg(stages_ms, "time/iteration_s")
    stages = [["rollout (graph: attempts, hints, mutations, judging, verify)", avg(stages_ms, "time/rollout_s")],
              ["update student", avg(stages_ms, "trainer/student_seconds")],
              ["update tutor", avg(stages_ms, "trainer/tutor_seconds")]]
    stages.append(["memory write, curriculum, logging", tot - sum(x[1] for x in stages)])
    table(f"full tutor iteration, policy_lag 0 ({tot:.3f} s), share of time per stage; peak RSS {peak_rss_mb():.0f} MB",
          ["stage", "seconds", "share"], [[n, f"{v:.3f}", f"{v / tot:.0%}"] for n, v in stages])
    table("trainer rows/s per role (full tutor)", ["role", "rows/s"],
          [[r, f"{avg(stages_ms, f'trainer/{r}_rows_per_s'):.0f}"] for r in ("student", "tutor")])
    ratios = []
    for lag in (0, 1):
        p = ours[f"policy_lag {lag}"]
        ratios.append([str(lag), " / ".join(f"{x:.3f}" for x in full[lag]), " / ".join(f"{x:.3f}" for x in p),
                       " / ".join(f"{f / x:.2f}x" for f, x in zip(full[lag], p)),
                       f"{statistics.median(full[lag]) / statistics.median(p):.2f}x"])
    table("full tutor (the default config) vs plain GRPO, each round's medians", ["policy_lag", "full tutor s/iteration",
          "plain s/iteration", "ratio per round", "ratio of medians"], ratios)

if __name__ == "__main__":
    main()
