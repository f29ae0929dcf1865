"""The generator interface: async requests (role, prompt, n samples) fused into batched forwards.

Episodes are coroutines; each awaits `Generator.generate(...)`. Requests are queued, and a flush is
scheduled when the first one arrives. The flush yields to the event loop until no new request has
arrived for a few turns (every runnable episode has reached its next model call), then hands ALL
queued rows to the backend in one call, mixed roles and per-row token caps included, and resolves
each request's future. (The torch backend then runs one sampler batch per adapter.) So 64 concurrent episodes give batches of ~64 x n rows,
not 64 batches. `batch_sizes` records the rows of every fused call (tests and benches read it).

Backends implement `complete(prompts, adapters, caps) -> list[Completion]`: `TorchBackend` (the
KV-cache sampler) here, `selfplay.vllm_backend.VLLMBackend` on a GPU.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from selfplay.functional import require_compiler
from selfplay.sampler import Completion, sample


@dataclass
class Sample:
    role: str
    prompt_ids: list[int]
    ids: list[int]  # completion ids (EOS included when finished)
    logprobs: list[float] | None  # None: the backend could not give the sampling distribution's
    text: str


class TorchBackend:
    """The KV-cache sampler over one merged copy of the base per adapter.

    peft's LoRA forward (and its per-row `adapter_names` path) costs more than the matmuls of a
    tiny model, so generation runs on plain copies of the base with W + scale * B @ A written in.
    The copies are rebuilt from the untouched base weights after every update (`sync_adapters`),
    so no merge/unmerge drift accumulates; a copy whose adapter weights did not change (the base,
    a frozen tutor) is left as it is. A fused batch with rows of several adapters is split
    by adapter, one sampler call each, and reassembled in order. Training and log-probs still go
    through the peft model; merged and unmerged log-probs agree to float rounding.
    """

    def __init__(self, policy, temperature: float, top_k: int, seed: int, compile: bool = False):
        self.policy = policy
        self.temperature, self.top_k = temperature, top_k
        if compile:
            require_compiler(policy.cfg.model.device, "generation.compile")
        self.compile = compile  # decode steps under torch.compile (generation.compile)
        self.rng = torch.Generator(device=policy.cfg.model.device).manual_seed(seed)
        self.models: dict[str, torch.nn.Module] = {}
        self.merged: dict[str, torch.Tensor] = {}  # adapter -> the LoRA weights its copy holds (flat)
        self.sync_adapters(0)

    def sync_adapters(self, version: int) -> None:
        """Write each changed adapter's merged weights into its generation copy of the base."""
        from peft.tuners.lora import LoraLayer
        from transformers import AutoModelForCausalLM

        pol = self.policy
        changed = []
        if not self.models:  # build the copies; the base copy is written once, here
            changed.append("__base__")
            for name in sorted(set(pol.adapters.values())) + ["__base__"]:
                m = AutoModelForCausalLM.from_pretrained(pol.path, dtype=pol.dtype).to(pol.cfg.model.device)
                self.models[name] = m.eval().requires_grad_(False)
            # (LoRA module, its weight in every copy): looked up once
            self.layers = [(mod, {a: m.get_parameter(n.removeprefix("base_model.model.") + ".weight")
                                  for a, m in self.models.items()})
                           for n, mod in pol.model.named_modules() if isinstance(mod, LoraLayer)]
        for role, name in pol.adapters.items():
            flat = pol.adapter_vector(role)
            if name not in changed and not (name in self.merged and torch.equal(self.merged[name], flat)):
                changed.append(name)
                self.merged[name] = flat
        with torch.no_grad():
            for mod, weights in self.layers:
                base_w = mod.get_base_layer().weight
                for name in changed:
                    w = weights[name]
                    if name == "__base__":
                        w.copy_(base_w)
                    elif mod.fan_in_fan_out or mod.use_dora.get(name) or base_w.dtype != mod.lora_A[name].weight.dtype:
                        w.copy_(base_w + mod.get_delta_weight(name))
                    else:  # W + scale * B @ A, what get_delta_weight computes, in one kernel
                        torch.addmm(base_w, mod.lora_B[name].weight, mod.lora_A[name].weight,
                                    alpha=mod.scaling[name], out=w)

    def sleep(self) -> None:
        """Nothing to free while the trainer runs (vLLM frees its KV cache here)."""

    def close(self) -> None:
        """Nothing to stop (vLLM stops its engine process here)."""

    def complete(self, prompts, adapters, caps, temperature=None) -> list[Completion]:
        pol = self.policy
        out: list[Completion | None] = [None] * len(prompts)
        for name in dict.fromkeys(adapters):  # first-seen order keeps the RNG stream deterministic
            idx = [i for i, a in enumerate(adapters) if a == name]
            res = sample(self.models[name], [prompts[i] for i in idx], max_new_tokens=[caps[i] for i in idx],
                         eos_id=pol.eos_id, pad_id=pol.pad_id,
                         temperature=self.temperature if temperature is None else temperature,
                         top_k=self.top_k, generator=self.rng, compile=self.compile)
            for i, c in zip(idx, res):
                out[i] = c
        return out

    def rng_state(self):
        return self.rng.get_state()

    def set_rng_state(self, state) -> None:
        self.rng.set_state(state)


@dataclass
class _Request:
    role: str
    prompts: list[list[int]]
    cap: int
    future: asyncio.Future


class Generator:
    def __init__(self, policy, backend, max_batch: int, settle: int = 25):
        self.policy, self.backend = policy, backend
        self.max_batch, self.settle = max_batch, settle
        self.queue: list[_Request] = []
        self._flush: asyncio.Task | None = None
        self.batch_sizes: list[int] = []
        self.seconds = 0.0

    async def generate(self, role: str, prompt_ids: list[int], n: int, max_new_tokens: int) -> list[Sample]:
        """n samples of `role` for one prompt; resolves when the fused batch holding them ran."""
        fut = asyncio.get_running_loop().create_future()
        self.queue.append(_Request(role, [prompt_ids] * n, max_new_tokens, fut))
        if self._flush is None or self._flush.done():
            self._flush = asyncio.ensure_future(self._run())
        return await fut

    async def _run(self) -> None:
        seen, quiet = -1, 0
        while quiet < self.settle:  # wait until every runnable episode has queued its next call
            await asyncio.sleep(0)
            quiet = quiet + 1 if len(self.queue) == seen else 0
            seen = len(self.queue)
        reqs, self.queue = self.queue, []
        try:
            self._complete(reqs)
        except Exception as e:  # surface a backend failure in every waiting episode
            for r in reqs:
                if not r.future.done():
                    r.future.set_exception(e)
        if self.queue:  # requests queued while we ran
            self._flush = asyncio.ensure_future(self._run())

    def _complete(self, reqs: list[_Request]) -> None:
        rows = [(r, p) for r in reqs for p in r.prompts]
        outs: list[Completion] = []
        t0 = time.perf_counter()
        for i in range(0, len(rows), self.max_batch):
            chunk = rows[i: i + self.max_batch]
            self.batch_sizes.append(len(chunk))
            outs += self.backend.complete([p for _, p in chunk],
                                          [self.policy.adapters[r.role] for r, _ in chunk],
                                          [r.cap for r, _ in chunk])
        self.seconds += time.perf_counter() - t0
        texts = self.policy.decode_batch([c.ids for c in outs])
        k = 0
        for r in reqs:
            samples = []
            for p in r.prompts:
                c = outs[k]
                samples.append(Sample(r.role, p, c.ids, c.logprobs, texts[k]))
                k += 1
            r.future.set_result(samples)
