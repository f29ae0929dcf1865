"""vLLM server backend: generation on OpenAI-compatible vLLM servers, adapters loaded at run time.

`model.backend: vllm_server` with `model.servers: [http://host:port, ...]`; start each server with
`selfplay vllm-serve --port P` (same config), which runs vLLM's OpenAI server on this run's base
with runtime LoRA updating. This process needs no vLLM, only HTTP (stdlib `urllib`).

- Adapters: after every update `sync_adapters` saves each role's adapter to a new directory (the
  servers must see the path: same machine, or a shared folder for several nodes) and loads it on
  every live server under a NEW name (`student-<run token>-s3`: unique across runs and resumes that
  share a server), then unloads the previous names. Syncs happen
  between fused batches, so no request in flight still uses an unloaded name.
- Token ids in and out: `prompt` is a list of ids, `return_token_ids`, `detokenize: false`.
  Identical rows of one batch (a group's G attempts) are one request with `n = G`.
- Behaviour log-probs: the server runs with `--logprobs-mode processed_logprobs`, so `logprobs: 0`
  returns each sampled token's log-prob under logits / T with top-k, as the trainer scores them.
- Routing: a request goes to the server that served its prompt before (sticky: an episode's later
  calls extend its prompt, so a server's prefix cache keeps helping), else to the least-loaded
  live server (rows assigned in this batch).
- Failures: a request that cannot reach its server (refused, reset, timeout) marks it down and is
  retried on another live server with exponential backoff; a down server is probed again after
  `model.server_retry_s` and gets the current adapters before it serves. When no server is left,
  the batch raises, the iteration fails, the checkpoint is intact and `selfplay run --resume DIR`
  continues: no episode is half-stored.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from selfplay.sampler import Completion
from selfplay.vllm_backend import save_adapter_version, vllm_lora_rank

STICKY_PREFIX = 8  # prompt tokens that identify an episode's task for routing
BASE_NAME = "base"  # the served name of the base model (`--served-model-name`): rows without adapter


class ServerError(RuntimeError):
    """A server answered with an error (a config problem, not a dropped server)."""


def server_command(cfg, base_path: str, port: int) -> list[str]:
    """Arguments after `python` that start a vLLM OpenAI server fit for this config."""
    m = cfg.model
    cmd = ["-m", "vllm.entrypoints.openai.api_server", "--model", base_path, "--dtype", m.dtype,
           "--enable-lora", "--max-loras", "3", "--max-lora-rank", str(vllm_lora_rank(cfg.lora.r)),
           "--logprobs-mode", "processed_logprobs", "--served-model-name", BASE_NAME,
           "--port", str(port), "--seed", str(cfg.seed),
           "--disable-log-stats"]
    if m.device == "cpu":
        cmd += ["--enforce-eager"]
    if m.vllm_kv_cache_mb or m.device == "cpu":
        cmd += ["--kv-cache-memory-bytes", str((m.vllm_kv_cache_mb or 256) * 2**20)]
    else:
        cmd += ["--gpu-memory-utilization", str(m.gpu_memory_utilization)]
    return cmd


class VLLMServerBackend:
    def __init__(self, policy, cfg, workdir: Path | None = None):
        if not cfg.model.servers:
            raise ValueError("model.backend=vllm_server needs model.servers: [http://host:port, ...]")
        self.policy, self.cfg = policy, cfg
        self.servers = [s.rstrip("/") for s in cfg.model.servers]
        self.down: dict[str, float] = {}  # server -> when it was marked down
        self.loaded: dict[str, set[str]] = {s: set() for s in self.servers}
        self.home: dict[tuple, str] = {}
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="selfplay-vllm-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._serial = itertools.count()
        self.token = uuid.uuid4().hex[:8]  # names unique across runs and resumes sharing a server
        self.names: dict[str, str] = {}  # adapter -> served name of the current version
        self.paths: dict[str, str] = {}
        self.dirs: list[Path] = []
        self._calls = 0
        self._lock = threading.Lock()  # adapter loads from request threads
        self.retries = {"server_retries": 0, "servers_down": 0}  # cumulative, logged as rollout/*
        self.sync_adapters(0)

    # ---------------------------------------------------------------- HTTP

    def _post(self, server: str, path: str, body: dict) -> dict | str:
        req = urllib.request.Request(server + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.model.server_timeout_s) as r:
                text = r.read().decode()
        except urllib.error.HTTPError as e:  # the server is up and refused: say why
            detail = e.read().decode(errors="replace")[:300]
            raise ServerError(f"{server}{path}: HTTP {e.code}: {detail}") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text

    def _alive(self, server: str) -> bool:
        try:
            with urllib.request.urlopen(server + "/health", timeout=5) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def _mark_down(self, server: str) -> None:
        if server not in self.down:
            self.down[server] = time.monotonic()
            self.retries["servers_down"] += 1
        self.loaded[server] = set()  # a restarted server has lost its adapters
        self.home = {k: s for k, s in self.home.items() if s != server}

    def live(self) -> list[str]:
        """Servers believed up; a down one is probed again after `server_retry_s` and, if it
        answers, gets the current adapters before it serves."""
        now = time.monotonic()
        for s, since in list(self.down.items()):
            if now - since >= self.cfg.model.server_retry_s:
                if self._alive(s) and self._load_current(s):
                    del self.down[s]
                else:
                    self.down[s] = now
        return [s for s in self.servers if s not in self.down]

    # ---------------------------------------------------------------- adapters

    def _load_current(self, server: str) -> bool:
        with self._lock:
            return self._load_current_locked(server)

    def _load_current_locked(self, server: str) -> bool:
        try:
            for adapter, name in self.names.items():
                if name not in self.loaded[server]:
                    self._post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": self.paths[adapter]})
                    self.loaded[server].add(name)
            for old in self.loaded[server] - set(self.names.values()):
                self._post(server, "/v1/unload_lora_adapter", {"lora_name": old})
                self.loaded[server].discard(old)
        except (OSError, urllib.error.URLError):
            self._mark_down(server)
            return False
        return True

    def sync_adapters(self, version: int) -> None:
        """Save each adapter to a fresh directory, load it on every live server under a fresh name,
        unload the previous names."""
        serial = next(self._serial)
        self.paths = save_adapter_version(self.policy, self.workdir, serial, self.dirs)
        self.names = {a: f"{a}-{self.token}-s{serial}" for a in self.paths}
        for s in self.live():
            self._load_current(s)
        if not self.live():
            raise RuntimeError(f"no vLLM server reachable: {', '.join(self.servers)}")

    def sleep(self) -> None:
        """The servers keep their KV cache (they run beside the trainer, not inside it)."""

    def close(self) -> None:
        """Nothing to stop: the servers outlive the run."""

    # ---------------------------------------------------------------- generation

    def _route(self, key: tuple, load: dict[str, int], live: list[str]) -> str:
        s = self.home.get(key)
        if s not in live:
            s = min(live, key=lambda x: load[x])
            self.home[key] = s
        return s

    def _request(self, server: str, model: str, prompt: list[int], n: int, cap: int, temp: float, seed: int):
        body = {"model": model, "prompt": [prompt], "n": n, "max_tokens": cap, "temperature": temp,
                "top_k": self.cfg.generation.top_k or -1, "logprobs": 0, "seed": seed,
                "return_token_ids": True, "detokenize": False}
        tried, reloaded = [], False
        for attempt in range(len(self.servers) + 2):
            live = [s for s in self.live() if s not in tried] or self.live()
            if server not in live:
                if not live:
                    break
                server = live[0]
            try:
                if model != BASE_NAME and model not in self.loaded[server] and not self._load_current(server):
                    raise OSError("adapter load failed")
                out = self._post(server, "/v1/completions", body)
                return [(c["token_ids"], c["logprobs"]["token_logprobs"] if c.get("logprobs") else None)
                        for c in sorted(out["choices"], key=lambda c: c["index"])]
            except ServerError as e:  # a restarted server we did not see go down lost its adapters
                if " 404" not in str(e) or reloaded:
                    raise
                reloaded, self.loaded[server] = True, set()
            except (OSError, urllib.error.URLError):  # refused, reset, timed out: the server dropped
                self._mark_down(server)
                tried.append(server)
                self.retries["server_retries"] += 1
                time.sleep(min(0.2 * 2 ** attempt, 5.0))
        raise RuntimeError(f"every vLLM server is down ({', '.join(self.servers)}); "
                           "the iteration is lost, its checkpoint is not: `selfplay run --resume DIR`")

    def complete(self, prompts, adapters, caps, temperature=None) -> list[Completion]:
        temp = self.cfg.generation.temperature if temperature is None else temperature
        self._calls += 1
        groups: dict[tuple, list[int]] = {}
        for i, (p, a, c) in enumerate(zip(prompts, adapters, caps)):
            groups.setdefault((a, tuple(p), c), []).append(i)
        live = self.live()
        if not live:
            raise RuntimeError(f"every vLLM server is down ({', '.join(self.servers)})")
        load = {s: 0 for s in live}
        jobs = []
        for g, ((a, p, c), idx) in enumerate(groups.items()):
            server = self._route(p[:STICKY_PREFIX], load, live)
            load[server] += len(idx)
            model = self.names[a] if a != "__base__" else BASE_NAME
            seed = (self.cfg.seed * 1_000_003 + self._calls * 7919 + g) % 2**31
            jobs.append((server, model, list(p), len(idx), c, temp, seed))
        with ThreadPoolExecutor(max_workers=min(32, len(jobs))) as pool:
            results = list(pool.map(lambda j: self._request(*j), jobs))
        out: list[Completion | None] = [None] * len(prompts)
        for idx, res in zip(groups.values(), results):
            for i, (ids, lps) in zip(idx, res):
                out[i] = Completion(list(ids), lps, bool(ids) and ids[-1] == self.policy.eos_id)
        return out

    def rng_state(self):
        return {"calls": self._calls}

    def set_rng_state(self, state) -> None:
        self._calls = state["calls"]
