"""Generation tokens/s at the same total batch: HF `generate` vs our KV-cache sampler vs concurrent
requests through the micro-batcher vs whole episodes through the LangGraph graph (tutor off), and
our sampler with `generation.compile` (when a C++ compiler is on PATH; its compile falls in the
warm-up).

    python bench/generation.py [--threads 2] [--episodes 16] [--group 8] [--repeats 10]

Each path runs once per round, `--repeats` interleaved rounds (one warm-up each first); its time is
its best round, its speed against our sampler the median over rounds of the two times in the same
round (the machine's speed drifts by tens of percent within a minute).
"""

from __future__ import annotations

import asyncio
import statistics
import time

import torch

from common import args, setup, table
from selfplay.domains.countdown import generate_tasks
from selfplay.generator import Generator, TorchBackend
from selfplay.graph import build_graph, episode_input, run_episodes
from selfplay.prompts import Prompts
from selfplay.sampler import sample


def main():
    a = args(lambda p: (p.add_argument("--episodes", type=int, default=16), p.add_argument("--group", type=int, default=8)))
    cfg, pol = setup(a.threads, [*a.set, "graph.hint=false", "graph.mutate=false", "graph.judge=false",
                                 f"graph.group_size={a.group}"])
    prompts = Prompts(cfg.prompts)
    tasks = generate_tasks(a.episodes, 99)
    ids = [pol.encode(prompts.render("attempt", numbers=t.numbers, target=t.target, hint=None)) for t in tasks]
    rows = [p for p in ids for _ in range(a.group)]
    cap = cfg.generation.max_new_tokens
    model = pol.model.eval()
    dev = cfg.model.device
    rows_out = []

    def hf():
        n = 0
        for p in ids:  # one generate call per prompt group, left padding not needed
            g = model.generate(input_ids=torch.tensor([p] * a.group, device=dev),
                               attention_mask=torch.ones(a.group, len(p), dtype=torch.long, device=dev),
                               do_sample=True, max_new_tokens=cap, pad_token_id=pol.pad_id, eos_token_id=pol.eos_id)
            n += int((g[:, len(p):] != pol.pad_id).sum())
        return n

    def hf_batched():
        enc = pol.tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(dev)
        g = model.generate(**enc, do_sample=True, max_new_tokens=cap, pad_token_id=pol.pad_id, eos_token_id=pol.eos_id)
        return int((g[:, enc["input_ids"].shape[1]:] != pol.pad_id).sum())

    backend = TorchBackend(pol, 1.0, 0, 0)
    loop = asyncio.new_event_loop()  # one event loop for the bench, as a run has one for all its iterations

    def peft_sampler():
        outs = sample(model, rows, max_new_tokens=cap, eos_id=pol.eos_id, pad_id=pol.pad_id,
                      adapter_names=["student"] * len(rows), generator=torch.Generator(dev).manual_seed(0))
        return sum(len(o.ids) for o in outs)

    def ours():
        backend.rng.manual_seed(0)  # every merged-weight path draws the same samples: pure overhead
        return sum(len(o.ids) for o in backend.complete(rows, ["student"] * len(rows), [cap] * len(rows)))

    try:
        decode_compiled = TorchBackend(pol, 1.0, 0, 0, compile=True)
    except RuntimeError:  # no C++ compiler on PATH: that row is left out
        decode_compiled = None

    def ours_compiled():  # the same sampler with its decode steps under torch.compile (compiled in the warm-up)
        decode_compiled.rng.manual_seed(0)
        return sum(len(o.ids) for o in decode_compiled.complete(rows, ["student"] * len(rows), [cap] * len(rows)))

    def batcher():
        backend.rng.manual_seed(0)
        gen = Generator(pol, backend, 4096)

        async def go():
            res = await asyncio.gather(*[gen.generate("student", p, a.group, cap) for p in ids])
            return sum(len(s.ids) for r in res for s in r)
        n = loop.run_until_complete(go())
        rows_out.append(gen.batch_sizes)
        return n

    graph_gen = Generator(pol, backend, 4096)
    compiled = build_graph(cfg, graph_gen, prompts, {"student": 0, "tutor": 0})  # once, as the loop does

    def graph():
        backend.rng.manual_seed(0)
        gen, g = graph_gen, compiled
        states = loop.run_until_complete(run_episodes(g, [episode_input(f"b.{k}", 0, t, None) for k, t in enumerate(tasks)], 64))
        rows_out.append(gen.batch_sizes)
        return sum(t["completion_tokens"] for s in states for t in s["turns"])

    paths = (("HF generate, peft model (per prompt)", hf), ("HF generate, peft model (one batch)", hf_batched),
             ("our sampler on the peft model (one batch)", peft_sampler),
             ("our sampler, merged weights (one batch)", ours), ("micro-batcher (concurrent requests)", batcher),
             ("full graph (episodes, verify)", graph))
    if decode_compiled:
        paths += (("our sampler, merged weights, generation.compile", ours_compiled),)
    for _, fn in paths:  # warm-up
        fn()
    times, tokens = {name: [] for name, _ in paths}, {}
    for _ in range(a.repeats):  # interleaved rounds, so the machine's drift hits every path alike
        for name, fn in paths:
            t0 = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t0)
    ref = next(times[name] for name, _ in paths if name.startswith("our sampler, merged"))
    results = []
    for name, _ in paths:
        n, t = tokens[name], min(times[name])
        # each round's time against our sampler's in the same round (every path draws the same
        # tokens each round): the machine's drift over the run cancels, which best-of-N per path does not
        vs = statistics.median(r / x for r, x in zip(ref, times[name]))
        results.append([name, f"{n}", f"{t * 1000:.0f}", f"{n / t:,.0f}", f"{vs:.2f}",
                        f"{a.episodes / t:.1f}" if name.startswith("full") else ""])
    table(f"generation, {a.episodes} prompts x {a.group} samples, {a.threads} threads, cap {cap} tokens "
          f"({pol.n_params / 1e6:.2f}M params); fused batch sizes seen: {rows_out[-1]}",
          ["path", "tokens", "ms (best)", "tokens/s (best)", "vs our sampler (merged), median per round", "episodes/s"], results)


if __name__ == "__main__":
    main()
