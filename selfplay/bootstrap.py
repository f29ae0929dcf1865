"""The embedded default base: a character tokenizer and a tiny Qwen2, pretrained on synthetic turns.

No model hub is reachable, so the project builds its own base.

Deviation from DESIGN.md: the tiny model answers with expressions, not step lists. A 0.86M
character-level model pretrained for 150 s on 2 cores wrote step lists with 65% arithmetic errors
(its intermediate results were wrong); expressions carry no intermediate results, so a
well-formed answer is arithmetically valid by construction and the verifier does the arithmetic.
Random parenthesised trees alone were not learnable in that budget (94% of answers dropped a
number), so the prior is mostly flat expressions, which can express ~90% of tasks' solutions.
The step format is still accepted by the verifier (real models may use it). The synthetic corpus renders every
template in `prompts/tiny/` (its kind is the file name's prefix) with random variables and a random
but well-formed completion, so the prior is "syntactically valid, semantically random":

- attempt: a random expression using every number once: mostly flat, `25-7+3` in a random order
  with random operators (standard precedence), and `paren_fraction` of the time a random fully
  parenthesised tree, `(25-7)*3`. The target is independent of it (except `aim_fraction` of the
  time), so the prior does not aim: it solves a task only by chance. With a hint `a op b` in the
  prompt, the answer starts with the hint (or contains it as a subtree), so hints work from step 0.
- hint: a random count of the given solution's tokens to reveal (1 .. all but one), so the tutor
  knows the form from step 0 and RL decides how much to reveal (`graph.hint_form: reveal`).
- mutate: one random edit of the parent (add / remove / replace a number, or a new target).
- judge: a random verdict, Y or N.
- arith (`arith_fraction` of the corpus, 0 by default): arithmetic facts `E:25-7=` → `18`, the
  value of `a op b` over two numbers (whole values 0..1000 only). Not a turn kind: it
  gives the base what any pretrained LM has (arithmetic facts) without aiming (its Countdown
  answers stay random), to test whether the student's learning is limited by arithmetic;
  `arith_shuffled` is the control (each fact shows another fact's value).

Loss is on completion tokens (and EOS) only. The result is saved with `save_pretrained` in a cache
directory keyed by the bootstrap config, and loads with `AutoModelForCausalLM` like any model.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from fractions import Fraction
from pathlib import Path

import jinja2
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from selfplay.config import BootstrapCfg, asset_dir
from selfplay.domains.countdown import Difficulty, Task, random_expr, verify
from selfplay.tokenizer import build_tokenizer

FORMAT_VERSION = 5  # bump when the tokenizer or corpus changes, so stale cached bases are not reused
ADDED = {"arith_fraction": 0.0, "arith_shuffled": False}  # BootstrapCfg fields added since, at their defaults


def base_dir(cfg: BootstrapCfg, cache_dir: str) -> Path:
    # fields added after format 5 enter the key only when set: at their defaults the corpus is the
    # same as before they existed, so already-built bases stay valid
    fields = {k: v for k, v in cfg.model_dump().items() if k not in ADDED or v != ADDED[k]}
    key = json.dumps({"v": FORMAT_VERSION, **fields}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return Path(cache_dir).expanduser() / f"tiny-{digest}"


def _task(rng: random.Random, cfg: BootstrapCfg) -> Task:
    """Numbers as in training; the target uniform in 1..100 and independent of them: the prior never
    aims, so a target is only prompt text to it (and reachable-target draws of 5 numbers would cost
    ~70 ms each, minutes over the corpus)."""
    k = rng.randint(2, cfg.max_count)
    return Task([rng.randint(1, cfg.max_value) for _ in range(k)], rng.randint(1, 100))


def _flat(numbers: list[int], rng: random.Random, prefix: str = "") -> str:
    """`a op b op c ...` over a random order (standard precedence), continuing `prefix` if given."""
    nums = list(numbers)
    rng.shuffle(nums)
    parts = [prefix] if prefix else [str(nums.pop())]
    for n in nums:
        parts += [rng.choice("+-*/"), str(n)]
    return "".join(parts)


def _pair(numbers: list[int], rng: random.Random) -> tuple[str, list[int]]:
    """A random `a op b` over two of the numbers (a hint), and the numbers it leaves."""
    i, j = rng.sample(range(len(numbers)), 2)
    return f"{numbers[i]}{rng.choice('+-*/')}{numbers[j]}", [x for k, x in enumerate(numbers) if k not in (i, j)]


def attempt_text(numbers: list[int], rng: random.Random, cfg: BootstrapCfg, hint: str | None = None,
                 rest: list[int] | None = None) -> str:
    """The prior's answer: flat most of the time, a random parenthesised tree `paren_fraction` of it."""
    if rng.random() < cfg.paren_fraction:
        if hint:
            return random_expr(rest + [(hint, Fraction(0))], rng)[0]  # the value is not needed for text
        return random_expr(numbers, rng)[0]
    return _flat(rest, rng, prefix=hint) if hint else _flat(numbers, rng)


def example(kind: str, rng: random.Random, cfg: BootstrapCfg) -> tuple[dict, str]:
    """Template variables and a well-formed random completion for one turn kind."""
    t = _task(rng, cfg)
    v = {"numbers": t.numbers, "target": t.target}
    if kind == "attempt":
        hint = rest = None
        if rng.random() < cfg.hint_fraction and len(t.numbers) > 2:
            hint, rest = _pair(t.numbers, rng)
        text = attempt_text(t.numbers, rng, cfg, hint, rest)
        if rng.random() < cfg.aim_fraction:
            val = verify(text, t.numbers, 0).value
            if val is not None and val.denominator == 1 and val > 0:
                v["target"] = int(val)
        return {**v, "hint": hint}, text
    if kind == "hint":  # the form only: how many tokens of the given solution to reveal, at random
        solution = attempt_text(t.numbers, rng, cfg)
        n_tokens = len(re.findall(r"\d+|.", solution))  # the embedded tokenizer's tokens
        return {**v, "attempt": attempt_text(t.numbers, rng, cfg), "solution": solution}, str(rng.randint(1, n_tokens - 1))
    if kind == "mutate":
        nums, target = list(t.numbers), t.target
        op = rng.choice(["add", "remove", "replace", "retarget"])
        if op == "add" and len(nums) < cfg.max_count:
            nums.append(rng.randint(1, cfg.max_value))
        elif op == "remove" and len(nums) > 2:
            nums.pop(rng.randrange(len(nums)))
        elif op == "replace":
            nums[rng.randrange(len(nums))] = rng.randint(1, cfg.max_value)
        else:
            target = _task(rng, cfg).target
        return {**v, "solve_bucket": rng.randint(0, 9)}, " ".join(map(str, nums)) + f">{target}"
    if kind == "judge":
        return {**v, "attempt": attempt_text(t.numbers, rng, cfg)}, rng.choice("YN")
    raise ValueError(kind)


def arith_example(rng: random.Random, cfg: BootstrapCfg, shuffled: bool | None = None) -> tuple[str, str]:
    """(prompt, completion) of one arithmetic fact: `a op b` over two numbers and its value, redrawn
    until the value is a whole number in 0..1000 (one token). With `arith_shuffled` (the control) the
    completion is the value of another, independent fact: the same format and values, no arithmetic."""
    while True:
        nums = [rng.randint(1, cfg.max_value) for _ in range(2)]
        text = f"{nums[0]}{rng.choice('+-*/')}{nums[1]}"
        val = verify(text, nums, 0).value
        if val is not None and val == int(val) and 0 <= val <= 1000:
            break
    shuffled = cfg.arith_shuffled if shuffled is None else shuffled
    if shuffled:
        val = arith_example(rng, cfg, shuffled=False)[1]
    return f"E:{text}=", str(int(val))


KIND_WEIGHTS = {"attempt": 0.85, "hint": 0.05, "mutate": 0.05, "judge": 0.05}


def kind_weights(cfg: BootstrapCfg) -> dict[str, float]:
    """The turn kinds' shares scaled by 1 - arith_fraction, then `arith` (last, so a zero share
    draws the same corpus as before it existed)."""
    return {**{k: w * (1 - cfg.arith_fraction) for k, w in KIND_WEIGHTS.items()}, "arith": cfg.arith_fraction}


def corpus_templates() -> dict[str, list[jinja2.Template]]:
    folder = asset_dir("prompts") / "tiny"
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)), undefined=jinja2.StrictUndefined)
    out: dict[str, list] = {k: [] for k in KIND_WEIGHTS}
    for p in sorted(folder.glob("*.j2")):
        kind = p.stem.split("_")[0]
        if kind in out:
            out[kind].append(env.get_template(p.name))
    return out


def batch(rng: random.Random, tok, templates, cfg: BootstrapCfg, n: int):
    """(input_ids, labels) right-padded; labels are -100 on the prompt and padding."""
    weights = kind_weights(cfg)
    kinds = rng.choices(list(weights), weights=list(weights.values()), k=n)
    seqs = []
    for kind in kinds:
        if kind == "arith":
            prompt, completion = arith_example(rng, cfg)
        else:
            vars, completion = example(kind, rng, cfg)
            prompt = rng.choice(templates[kind]).render(**vars)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(((p_ids + c_ids)[: cfg.max_positions], len(p_ids)))
    T = max(len(s) for s, _ in seqs)
    ids = torch.full((n, T), tok.pad_token_id)
    labels = torch.full((n, T), -100)
    for i, (s, p) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, p: len(s)] = ids[i, p: len(s)]
    return ids, labels


def build_model(cfg: BootstrapCfg, vocab_size: int, pad_id: int, eos_id: int) -> Qwen2ForCausalLM:
    torch.manual_seed(cfg.seed)
    mc = Qwen2Config(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                     max_position_embeddings=cfg.max_positions, tie_word_embeddings=True,
                     pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id)
    return Qwen2ForCausalLM(mc)


def pretrain(cfg: BootstrapCfg, out: Path, progress=None) -> dict:
    """Pretrain the tiny base and save model + tokenizer to `out`. Returns training stats."""
    tok = build_tokenizer()
    model = build_model(cfg, len(tok), tok.pad_token_id, tok.eos_token_id)
    templates = corpus_templates()
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    t0, tokens, step, ema = time.time(), 0, 0, None
    warmup = 50
    while step < cfg.steps and time.time() - t0 < cfg.seconds:
        # schedule on the time budget so a slower machine still ends with a decayed learning rate
        frac = max(step / cfg.steps, (time.time() - t0) / cfg.seconds)
        lr = cfg.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        ids, labels = batch(rng, tok, templates, cfg, cfg.batch_size)
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += int((ids != tok.pad_token_id).sum())
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if progress:
            progress(step, time.time() - t0, ema)
    wall = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    stats = {"params": sum(p.numel() for p in model.parameters()), "steps": step, "seconds": round(wall, 1),
             "tokens_per_s": round(tokens / wall), "final_loss": round(ema, 4), "config": cfg.model_dump()}
    (out / "bootstrap.json").write_text(json.dumps(stats, indent=2))
    return stats


def base_stats(path: Path, run_cfg, n_tasks: int = 200, samples: int = 4) -> dict:
    """Bootstrap stats plus the prior's solve and arithmetic-error rates on fixed tasks (3 and 4 numbers)."""
    from collections import Counter

    from selfplay.domains.countdown import generate_tasks, verify
    from selfplay.sampler import sample

    stats = json.loads((path / "bootstrap.json").read_text())
    if "prior" in stats:
        return stats
    from transformers import AutoModelForCausalLM

    from selfplay.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = load_tokenizer(path)
    tmpl = corpus_templates()["attempt"][0]
    prior = {}
    for k in (3, 4):
        tasks = generate_tasks(n_tasks, 777, Difficulty(k, k))
        ids = [tok(tmpl.render(numbers=t.numbers, target=t.target, hint=None), add_special_tokens=False)["input_ids"]
               for t in tasks]
        outs = sample(model, ids * samples, max_new_tokens=run_cfg.generation.max_new_tokens, eos_id=tok.eos_token_id,
                      pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
        c = Counter(verify(tok.decode(o.ids, skip_special_tokens=True), t.numbers, t.target).reason
                    for o, t in zip(outs, tasks * samples))
        prior[f"{k}_numbers"] = {r: round(n / len(outs), 4) for r, n in sorted(c.items())}
    if stats["config"].get("arith_fraction"):  # greedy accuracy on fresh arithmetic facts
        rng = random.Random(777)
        facts = [arith_example(rng, BootstrapCfg(**stats["config"]), shuffled=False) for _ in range(n_tasks)]
        outs = sample(model, [tok(p, add_special_tokens=False)["input_ids"] for p, _ in facts], max_new_tokens=4,
                      eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=0.0)
        prior["arith_accuracy"] = sum(tok.decode(o.ids, skip_special_tokens=True) == v
                                      for o, (_, v) in zip(outs, facts)) / n_tasks
    stats["prior"] = prior
    (path / "bootstrap.json").write_text(json.dumps(stats, indent=2))
    return stats
