"""vLLM generation backend (GPU): multi-LoRA serving of the role adapters.

Imported only when `model.backend: vllm`. The trainer keeps the peft model (on the same GPU);
after every update `sync_adapters` saves each role's adapter to a NEW versioned directory and
serves it under a NEW name and int id: vLLM caches adapters by name/id, and reusing them served
stale weights. Rows are routed per request with one `LoRARequest` each (`"__base__"` = none).
With `model.vllm_sleep`, the engine sleeps (frees KV cache) while the trainer runs.
Behaviour log-probs are vLLM's for the sampled tokens (`logprobs=0`) at T = 1 without top-k. vLLM
reports the raw model's log-probs, not the tempered/filtered ones the trainer scores, so otherwise
none are returned and the trainer takes the ratio's denominator from its own scoring.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

from selfplay.sampler import Completion


class VLLMBackend:
    def __init__(self, policy, cfg, workdir: Path | None = None):
        try:
            from vllm import LLM
        except ImportError:
            raise RuntimeError("model.backend=vllm needs vLLM: pip install -e '.[vllm]' (GPU only)") from None
        self.policy, self.cfg = policy, cfg
        self.workdir = Path(workdir or Path(cfg.model.cache_dir).expanduser() / "vllm-adapters")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.llm = LLM(model=str(policy.path), enable_lora=True, max_loras=2, max_lora_rank=cfg.lora.r,
                       gpu_memory_utilization=cfg.model.gpu_memory_utilization, dtype=cfg.model.dtype,
                       enable_sleep_mode=cfg.model.vllm_sleep, seed=cfg.seed, enforce_eager=False)
        self._ids = itertools.count(1)
        self.requests: dict[str, object] = {}
        self.seed = cfg.seed
        self._calls = 0
        self.sync_adapters(0)

    def sync_adapters(self, version: int) -> None:
        """Save each adapter to a fresh directory and register it under a fresh name and id."""
        from vllm.lora.request import LoRARequest

        if self.cfg.model.vllm_sleep and version > 0:
            self.llm.wake_up()
        d = self.workdir / f"v{version}"
        shutil.rmtree(d, ignore_errors=True)
        names = sorted(set(self.policy.adapters.values()))
        self.policy.model.save_pretrained(str(d), selected_adapters=names)
        old = self.workdir / f"v{version - 2}"  # keep the one being replaced until the new one is live
        shutil.rmtree(old, ignore_errors=True)
        self.requests = {}
        for name in names:
            sub = d / name if (d / name).is_dir() else d
            self.requests[name] = LoRARequest(f"{name}-v{version}", next(self._ids), str(sub))

    def sleep(self) -> None:
        if self.cfg.model.vllm_sleep:
            self.llm.sleep(level=1)

    def complete(self, prompts, adapters, caps, temperature=None) -> list[Completion]:
        from vllm import SamplingParams

        temp = self.cfg.generation.temperature if temperature is None else temperature
        self._calls += 1
        params = [SamplingParams(temperature=temp, top_k=self.cfg.generation.top_k or -1, max_tokens=c, logprobs=0,
                                 seed=self.seed * 1_000_003 + self._calls * 7919 + i)
                  for i, c in enumerate(caps)]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                 lora_request=[None if a == "__base__" else self.requests[a] for a in adapters],
                                 use_tqdm=False)
        result = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            lps = [lp[t].logprob if lp and t in lp else 0.0 for t, lp in zip(ids, c.logprobs or [None] * len(ids))]
            if temp != 1.0 or self.cfg.generation.top_k:
                lps = None  # raw, not the sampling distribution's
            result.append(Completion(ids, lps, bool(ids) and ids[-1] == self.policy.eos_id))
        return result

    def rng_state(self):
        return {"calls": self._calls}

    def set_rng_state(self, state) -> None:
        self._calls = state["calls"]
