"""A functional Qwen2/Llama forward: plain tensor ops over the weights of a loaded transformers
model. `Decoder` samples with a preallocated KV cache (the sampler's merged copies of the base);
`lora_logits` is the trainer's forward through one peft adapter, with gradients into the LoRA
weights: (W + s·B A) x with the merged weight, as the sampler computes it, and the LoRA gradients
by hand (`_LoraLinear`); each distinct prompt of a batch runs once and its rows share its keys/values.
Both take a layer as plain tensors (`_layer_weights`, `_lora_layer_weights`), with the projections
of one input (q, k, v; gate, up) stacked into one matmul; the trainer's layer (`_train_block`)
and the decoder's forward (`_decode`) touch no module, so `trainer.compile` and
`generation.compile` can run them under torch.compile, one graph each.

Why: at the tiny model's size, transformers' per-call machinery (mask construction, cache
objects, output classes, module hooks) costs about 4x the matmuls of a decode step (measured
8.8 ms vs 2.1 ms at batch 128). The math is the same as the modules': RMSNorm in float32, rotary
embedding from the model's own `rotary_emb`, q/k/v (with Qwen2's biases), grouped-query attention
through SDPA, SwiGLU MLP, final norm and the (possibly tied) head. Tested against the model's
forward (logits to 1e-5, greedy tokens identical) and peft's (log-probs and LoRA gradients) in
tests/test_policy.py.

Left-padded prompts: a padded query position may attend to itself (its whole row would be
masked otherwise, and SDPA returns NaN for a fully masked row, which would then leak into the
next layer's keys); real positions never see padding. Used by the sampler for supported models
(`supports`); anything else takes the transformers path.
"""

from __future__ import annotations

import functools
import shutil
from itertools import product

import torch
import torch.nn.functional as F


def require_compiler(device: str, setting: str) -> None:
    """torch.compile on a CPU builds C++ kernels (inductor): without a compiler on PATH, a one-line
    error at start naming the setting, not inductor's traceback in the first compiled call."""
    if torch.device(device).type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise RuntimeError(f"{setting} needs a C++ compiler on PATH (inductor builds C++ kernels); "
                           f"install g++ or set {setting}=false")


def supports(model) -> bool:
    """Plain Qwen2/Llama causal LMs with default RoPE, SiLU and full attention."""
    if type(model).__name__ not in ("Qwen2ForCausalLM", "LlamaForCausalLM"):
        return False
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    return (cfg.hidden_act == "silu" and rope.get("rope_type", "default") == "default"
            and not getattr(cfg, "use_sliding_window", False))


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _mask(mask: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T, T) allowed keys for left-padded rows: causal, no padding, and each position itself."""
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    return (causal & mask.bool()[:, None, :]) | torch.eye(T, dtype=torch.bool, device=mask.device)


def _mlp(x, norm, gate_up, down, eps, linear):
    """The layer's second half: x + SwiGLU MLP of its normed x (gate and up as one projection)."""
    gate, up = linear(_rms(x, norm, eps), gate_up).chunk(2, -1)
    return x + linear(F.silu(gate) * up, down)


def _qkv(h, qkv, cos, sin, H, Hkv, D, linear):
    """q (..., H, D), k and v (..., Hkv, D) of the normed h (..., d) from one stacked projection, q and
    k turned by the rotary embedding (cos, sin: (..., 1, D)) together: they are adjacent columns."""
    qk, v = linear(h, qkv).split([(H + Hkv) * D, Hkv * D], -1)
    qk = qk.unflatten(-1, (H + Hkv, D))
    qk = qk * cos + _rotate_half(qk) * sin
    return qk[..., :H, :], qk[..., H:, :], v.unflatten(-1, (Hkv, D))


def _dense(h, wb):
    """A projection of the decoder: wb = (weight, bias), the stacked weights of `_layer_weights`."""
    return F.linear(h, *wb)


def _block(x, w, cos, sin, H, Hkv, D, eps, allowed, kv=None):
    """One decoder layer for sampling; w = `_layer_weights` (stacked plain weights). `kv`
    (k_cache, v_cache, lo) writes the new keys/values at slot lo and attends over slots [0, hi)."""
    B, T, _ = x.shape
    norm1, qkv, o, norm2, gate_up, down = w
    q, k, v = _qkv(_rms(x, norm1, eps), qkv, cos, sin, H, Hkv, D, _dense)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, D)
    if kv is not None:
        kc, vc, lo = kv
        kc[:, :, lo:lo + T], vc[:, :, lo:lo + T] = k, v
        k, v = kc[:, :, :lo + T], vc[:, :, :lo + T]
    if T == 1:  # a decode step: plain math beats SDPA's CPU flash kernel at one query (1.5x measured)
        if Hkv != H:
            k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        scores = (q @ k.transpose(-1, -2)) * D ** -0.5  # (B, H, 1, S)
        a = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1) @ v  # (B, H, 1, D)
    else:
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=Hkv != H)  # (B, H, T, D)
    x = x + _dense(a.transpose(1, 2).reshape(B, T, H * D), o)
    return _mlp(x, norm2, gate_up, down, eps, _dense)


def _train_block(x, w, cos, sin, index, allowed_p, allowed_c, heads, eps):
    """One decoder layer of the trainer's forward over a flat (N, d) token matrix: the U·P prompt
    tokens, then the B·C completion tokens (allowed_p (U, P, P) and allowed_c (B, C, P + C) are
    their attention masks, `heads` = (H, Hkv, D)); w = `_lora_layer_weights`. Every per-token op
    (norms, the projections, rotary, MLP) runs once on all N tokens; only attention is split: the
    prompts attend causally among themselves, and completion row i attends to its prompt
    index[i]'s keys/values, then causally to its own. One op per projection instead of one per
    half: at this model's size the update pays per op as much as per FLOP (elementwise ops,
    dispatch). A function of tensors only (no modules), so `torch.compile` traces one layer and
    reuses it for every layer (`compiled_train_block`)."""
    (U, P), (B, C) = allowed_p.shape[:2], allowed_c.shape[:2]
    H, Hkv, D = heads
    n_p = U * P
    norm1, qkv, o, norm2, gate_up, down = w
    q, k, v = _qkv(_rms(x, norm1, eps), qkv, cos, sin, H, Hkv, D, _project)  # (N, H or Hkv, D); cos: (N, 1, D)

    def split(t, n, rows, T):  # (rows·T, n, D) -> (rows, n, T, D)
        return t.reshape(rows, T, n, D).transpose(1, 2)

    kp, vp = split(k[:n_p], Hkv, U, P), split(v[:n_p], Hkv, U, P)
    ap = F.scaled_dot_product_attention(split(q[:n_p], H, U, P), kp, vp, attn_mask=allowed_p[:, None],
                                        enable_gqa=Hkv != H)  # (U, H, P, D)
    # (_Rows, not [index]: advanced indexing's backward is 10x slower on CPU)
    kc = torch.cat([_Rows.apply(kp, index), split(k[n_p:], Hkv, B, C)], 2)  # (B, Hkv, P + C, D)
    vc = torch.cat([_Rows.apply(vp, index), split(v[n_p:], Hkv, B, C)], 2)
    ac = F.scaled_dot_product_attention(split(q[n_p:], H, B, C), kc, vc, attn_mask=allowed_c[:, None],
                                        enable_gqa=Hkv != H)  # (B, H, C, D)
    a = torch.cat([ap.transpose(1, 2).reshape(n_p, H * D), ac.transpose(1, 2).reshape(B * C, H * D)])  # (N, H·D)
    x = x + _project(a, o)
    return _mlp(x, norm2, gate_up, down, eps, _project)


@functools.cache
def compiled_train_block():
    """`_train_block` under torch.compile (inductor; the token, row and length dimensions marked
    dynamic by `lora_logits`, so batches of any size share one graph), built on first use. Fuses
    the elementwise ops of the forward and of the backward (norms, rotary, SwiGLU, residuals) into
    C++ loops: the update 1.3-1.6x faster at one thread on this project's CPU, after a one-time
    compile of ~50 s (~15 s from inductor's on-disk cache) (`trainer.compile`)."""
    return torch.compile(_train_block)


def _heads(c) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a model config."""
    H = c.num_attention_heads
    return H, c.num_key_value_heads, getattr(c, "head_dim", None) or c.hidden_size // H


def _stacked(weights, biases) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights and biases of projections of one input stacked along the output dimension, so q, k, v
    (or gate, up) are one matmul (the sampler's decode step 6% faster measured)."""
    if len(weights) == 1:
        return weights[0], biases[0]
    return torch.cat(weights), None if biases[0] is None else torch.cat(biases)  # Qwen2: all q/k/v biased


def _layer_weights(layer) -> tuple:
    """(norm1, qkv, o, norm2, gate_up, down) of a plain decoder layer, each projection a stacked
    (weight, bias) for `_dense`."""
    att, mlp = layer.self_attn, layer.mlp

    def stack(*mods):
        return _stacked([m.weight for m in mods], [m.bias for m in mods])

    return (layer.input_layernorm.weight, stack(att.q_proj, att.k_proj, att.v_proj), stack(att.o_proj),
            layer.post_attention_layernorm.weight, stack(mlp.gate_proj, mlp.up_proj), stack(mlp.down_proj))


class _Rows(torch.autograd.Function):
    """x.index_select(0, index) whose backward makes the incoming gradient contiguous before the
    index_add: autograd's own backward scatters the strided slice the attention's key/value
    concatenation hands it, 4x slower on CPU (0.30 vs 0.07 ms per call, 16 calls per update)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros((ctx.rows, *grad.shape[1:])).index_add_(0, index, grad.contiguous()), None


class _LoraLinear(torch.autograd.Function):
    """y = x W'ᵀ + b with W' = W + s·B A (the merged weight, the sampler's arithmetic), differentiable
    in the LoRA weights A (r, in) and B (out, r) and in x:

        dA = s·(dy B)ᵀ x        dB = s·dyᵀ (x Aᵀ)        dx = dy W'

    The same gradients as autograd's through x Wᵀ + s·(x Aᵀ) Bᵀ, with two of its five rank-r matmuls
    gone (s·(x Aᵀ) Bᵀ in the forward, (dy B) A in the backward: the merged weight carries them),
    and one graph node instead of five. W' is a constant here: the caller builds it from the
    current A and B. Several projections of one input (q, k, v) run as one: W' and b stacked along
    the output, the A's stacked along r, (A_1, B_1, A_2, B_2, ...) and one scale per projection; each
    dA_i, dB_i is computed from its own columns of dy, and dx is one matmul instead of k and their sum."""

    @staticmethod
    def forward(ctx, x, merged, bias, scales, *AB):
        As = AB[0::2]
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        a = x2 @ (torch.cat(As) if len(As) > 1 else As[0]).t()  # (M, Σr), for the dB's
        y = x2 @ merged.t() if bias is None else torch.addmm(bias, x2, merged.t())  # (M, Σout)
        ctx.save_for_backward(x2, a, merged, *AB[1::2])
        ctx.scales, ctx.shape, ctx.ranks = scales, x.shape, [A.shape[0] for A in As]
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x2, a, merged, *Bs = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # (M, Σout)
        outs = [len(B) for B in Bs]
        dys = dy2.split(outs, 1)  # (M, out_i) column blocks
        g = torch.cat([d @ B for d, B in zip(dys, Bs)], 1) if len(Bs) > 1 else dy2 @ Bs[0]  # (M, Σr)
        dAs = (g.t() @ x2).split(ctx.ranks)  # (r_i, in) each
        grads = []
        for dA, d, a_i, s in zip(dAs, dys, a.split(ctx.ranks, 1), ctx.scales):
            grads += [dA.mul_(s), (d.t() @ a_i).mul_(s)]  # dA_i (r_i, in), dB_i (out_i, r_i)
        dx = (dy2 @ merged).view(ctx.shape) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, *grads


def lora_supported(peft_model, adapter: str | None) -> bool:
    """A plain supported base under peft LoRA without dropout or DoRA (else: peft's forward)."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.base_model.model
    if not supports(base):
        return False
    for mod in base.modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            if (not isinstance(mod.lora_dropout[adapter], torch.nn.Identity) or mod.use_dora.get(adapter)
                    or mod.lora_B[adapter].bias is not None):
                return False
    return True


def _part(h, W, b, scales, AB):
    """One part of a trainer projection: x Wᵀ + b, W holding the merged LoRA weights (`_LoraLinear`
    for their gradients); or, for a half-precision base with fp32 adapters (peft's default), the
    base's W and the LoRA path apart in the adapter's dtype, added in the base's, as peft's forward
    does (a merged half-precision weight would round small LoRA deltas away). AB empty: no adapter."""
    if AB and W.dtype != AB[0].dtype:
        A, B = AB
        y = F.linear(h, W, b)
        return y + (F.linear(F.linear(h.to(A.dtype), A), B) * scales[0]).to(y.dtype)
    if not AB or not torch.is_grad_enabled():
        return F.linear(h, W, b)
    return _LoraLinear.apply(h, W, b, scales, *AB)


def _project(h, parts):
    """A projection of the trainer's forward: its parts' outputs side by side (one part, unless
    the adapter covers some of the stacked projections and not others)."""
    ys = [_part(h, *p) for p in parts]
    return ys[0] if len(ys) == 1 else torch.cat(ys, -1)


def _lora_part(mod, adapter) -> tuple:
    """(W, b, scales, AB) of one projection under `adapter` (None = the base)."""
    from peft.tuners.lora import LoraLayer

    base = mod.get_base_layer() if isinstance(mod, LoraLayer) else mod
    if not (isinstance(mod, LoraLayer) and adapter in mod.lora_A):
        return base.weight, base.bias, (), ()
    A, B, s = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight, mod.scaling[adapter]
    if base.weight.dtype != A.dtype:
        return base.weight, base.bias, (s,), (A, B)
    with torch.no_grad():
        return torch.addmm(base.weight, B, A, alpha=s), base.bias, (s,), (A, B)


def _lora_projection(mods, adapter) -> tuple:
    """`_project`'s parts for projections of one input: one stacked part (W and b stacked along the
    output, the scales and LoRA factors in order) when the adapter covers all of them merged or
    none of them, else one part each."""
    parts = [_lora_part(m, adapter) for m in mods]
    merged = [bool(p[3]) and p[0].dtype == p[3][0].dtype for p in parts]
    if len(parts) > 1 and (all(merged) or not any(p[3] for p in parts)):
        W, b = _stacked([p[0] for p in parts], [p[1] for p in parts])
        return ((W, b, sum((p[2] for p in parts), ()), sum((p[3] for p in parts), ())),)
    return tuple(parts)


def _lora_layer_weights(layer, adapter) -> tuple:
    """(norm1, qkv, o, norm2, gate_up, down) of a layer under `adapter`, projections as `_project`
    parts; the merged weights are built here, once per forward (28 rank-r products: ~0.3 ms)."""
    att, mlp = layer.self_attn, layer.mlp
    return (layer.input_layernorm.weight, _lora_projection((att.q_proj, att.k_proj, att.v_proj), adapter),
            _lora_projection((att.o_proj,), adapter), layer.post_attention_layernorm.weight,
            _lora_projection((mlp.gate_proj, mlp.up_proj), adapter), _lora_projection((mlp.down_proj,), adapter))


def lora_logits(peft_model, adapter: str | None, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                index: torch.Tensor, completion_ids: torch.Tensor, compile: bool = False) -> torch.Tensor:
    """Logits (B, C, V) predicting each completion token, through `adapter`'s LoRA (None = the
    base), differentiable in the LoRA weights; peft's sum base(x) + B(A(x)) * scaling computed as the
    sampler does, with the merged weight (W + scaling·B A) x (`_LoraLinear`).

    Shared prompts: row i's prompt is prompt_ids[index[i]] ((U, P), left-padded); its completion is
    completion_ids[i] ((B, C), right-padded). Each distinct prompt runs once and its keys/values
    are shared by its rows (the G samples of a group), so the gradient of every row flows back into
    one prompt pass: (U·P + B·C) token-forwards instead of B·(P + C). Prompt and completion tokens
    go through each projection together as one flat (U·P + B·C, d) matrix (`_train_block`):
    the learner's update 0.130 → 0.115 s at one thread on 105 rows (medians, README Benchmarks).
    `compile`: the layers run through `compiled_train_block`."""
    compile = compile and torch.is_grad_enabled()
    if compile and 1 in (*prompt_ids.shape, *completion_ids.shape):  # dynamo specialises a size of 1, which would
        # recompile (~15-50 s) the first time a micro-batch holds one prompt, row or token: pad it to 2
        # (a repeated prompt or row, a masked pad before a prompt, a token after a completion; their
        # outputs are dropped, so they get no gradient)
        B0, C0 = completion_ids.shape
        if len(prompt_ids) == 1:
            prompt_ids, prompt_mask = prompt_ids.repeat(2, 1), prompt_mask.repeat(2, 1)
        if prompt_ids.shape[1] == 1:
            prompt_ids, prompt_mask = F.pad(prompt_ids, (1, 0)), F.pad(prompt_mask, (1, 0))
        if B0 == 1:
            index, completion_ids = index.repeat(2), completion_ids.repeat(2, 1)
        if C0 == 1:
            completion_ids = F.pad(completion_ids, (0, 1))
        return lora_logits(peft_model, adapter, prompt_ids, prompt_mask, index, completion_ids, compile)[:B0, :C0]
    base = peft_model.base_model.model
    inner, c = base.model, base.config
    (U, P), (B, C) = prompt_ids.shape, completion_ids.shape
    n_p = U * P
    ids = torch.cat([prompt_ids.reshape(-1), completion_ids.reshape(-1)])  # (N,): prompts, then completions
    pos = torch.cat([(prompt_mask.cumsum(-1) - 1).clamp(min=0).reshape(-1),
                     (prompt_mask.sum(-1)[index][:, None] + torch.arange(C, device=ids.device)[None]).reshape(-1)])
    x = F.embedding(ids, inner.embed_tokens.weight)  # (N, d)
    cos, sin = inner.rotary_emb(x[None], pos[None])  # (1, N, D)
    cos, sin = cos[0, :, None], sin[0, :, None]  # (N, 1, D): broadcast over heads
    allowed_p = _mask(prompt_mask, P)  # (U, P, P)
    causal = torch.ones(C, C, dtype=torch.bool, device=ids.device).tril()
    allowed_c = torch.cat([prompt_mask.bool()[index][:, None, :].expand(B, C, P), causal.expand(B, C, C)], -1)
    block = _train_block
    if compile:
        block = compiled_train_block()
        x.requires_grad_()  # as every later layer's input: one compiled graph, not a second for layer 0
        for t in (x, cos, sin, index):  # (N, ...), (B,): token and row counts vary per call ...
            torch._dynamo.maybe_mark_dynamic(t, 0)
        for t, d in product((allowed_p, allowed_c), range(3)):  # ... and so do prompts and lengths; weights,
            torch._dynamo.maybe_mark_dynamic(t, d)  # heads and eps are constants
    heads = _heads(c)
    for layer in inner.layers:
        x = block(x, _lora_layer_weights(layer, adapter), cos, sin, index, allowed_p, allowed_c, heads, c.rms_norm_eps)
    xp, xc = x[:n_p].view(U, P, -1), x[n_p:].view(B, C, -1)
    h = torch.cat([xp[:, -1].index_select(0, index)[:, None], xc[:, :-1]], 1)  # (B, C, d): the prompt's last position predicts token 0
    return F.linear(_rms(h, inner.norm.weight, c.rms_norm_eps), base.lm_head.weight)


def _decode(ids, pos, allowed, n, embed, cos, sin, layers, caches, norm, head, heads, eps):
    """The decoder's forward of new tokens ids (B, T) at positions pos (B, T) over the KV cache
    (`caches`: per layer (k, v) (B, Hkv, S, D), the new keys/values written at slot n, `allowed` (B,
    T, n + T) the keys each query may see): the last position's logits (B, V). A function of tensors
    only, so `compiled_decode` can trace it."""
    x = F.embedding(ids, embed)  # (B, T, d)
    cos, sin = F.embedding(pos, cos)[:, :, None], F.embedding(pos, sin)[:, :, None]  # (B, T, 1, D)
    for w, (kc, vc) in zip(layers, caches):
        x = _block(x, w, cos, sin, *heads, eps, allowed, (kc, vc, n))
    return F.linear(_rms(x[:, -1], norm, eps), head)  # (B, V)


@functools.cache
def compiled_decode():
    """`_decode` under torch.compile for decode steps (`generation.compile`): one graph for every
    batch size above 1, cache length and step (dynamic from the start: the step n would otherwise
    be specialised once and recompiled), fusing each layer's norms, rotary, softmax and SwiGLU into
    C++ loops around the matmuls. The sampler's decode 1.2-1.3x faster on this project's CPU
    (README Benchmarks), after a one-time compile of ~25 s (~8 s from inductor's on-disk cache)."""
    return torch.compile(_decode, dynamic=True)


class Decoder:
    """prefill(ids, mask, pos) then step(tok, pos) for up to `max_new` tokens; both return the
    last position's logits (B, V)."""

    def __init__(self, model, batch: int, max_len: int, compile: bool = False):
        c = model.config
        self.compile = compile  # decode steps through `compiled_decode` (generation.compile)
        self.eps = c.rms_norm_eps
        self.H, self.Hkv, self.D = _heads(c)
        inner = model.model
        self.embed, self.norm = inner.embed_tokens.weight, inner.norm.weight
        self.layers = [_layer_weights(layer) for layer in inner.layers]  # the weights do not change during a call
        self.head = model.lm_head.weight
        dev, dt = self.embed.device, self.embed.dtype
        # empty, not zeros (zeroing cost 5% of a rollout): a slot is written before any query reads it
        self.k = [torch.empty(batch, self.Hkv, max_len, self.D, device=dev, dtype=dt) for _ in self.layers]
        self.v = [torch.empty(batch, self.Hkv, max_len, self.D, device=dev, dtype=dt) for _ in self.layers]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=dev)  # key slots holding real tokens
        # the rotary embedding of every position a call can reach, looked up per step instead of the
        # model's rotary module per step (the same values: a position's cos/sin do not depend on the
        # batch; tokens and log-probs identical, the sampler ~1% faster, A/B medians in one process)
        cos, sin = inner.rotary_emb(self.embed[None, :1], torch.arange(max_len, device=dev)[None])  # (1, max_len, D)
        self.cos, self.sin = cos[0], sin[0]
        self.n = 0  # slots filled

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """The first len(ids) rows of the cache take the new tokens."""
        rows = len(ids)
        caches = [(k[:rows], v[:rows]) for k, v in zip(self.k, self.v)]
        args = (ids, pos, allowed, self.n, self.embed, self.cos, self.sin, self.layers, caches, self.norm, self.head,
                (self.H, self.Hkv, self.D), self.eps)
        if self.compile and ids.shape[1] == 1 and rows > 1:  # a decode step (a batch of 1 would be a second graph)
            kv = [t for c in caches for t in c]
            for t, dims in ((ids, (0,)), (pos, (0,)), (allowed, (0, 2)), (self.cos, (0,)), (self.sin, (0,)),
                            *((t, (0, 2)) for t in kv)):  # rows and cache slots, each its own symbol: with
                for d in dims:  # dynamic=True alone a batch of 128 rows shared the width's symbol and recompiled
                    torch._dynamo.maybe_mark_dynamic(t, d)
            logits = compiled_decode()(*args)
        else:
            logits = _decode(*args)
        self.n += ids.shape[1]
        return logits

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids, mask, pos: (B, P), left-padded. Identical prompts (a group's G rows) run once; their
        keys/values are then copied to each of their rows."""
        P = ids.shape[1]
        self.valid[:, :P] = mask.bool()
        uniq, index = torch.unique(torch.cat([ids, mask], 1), dim=0, return_inverse=True)
        u_ids, u_mask = uniq[:, :P], uniq[:, P:]
        logits = self._forward(u_ids, (u_mask.cumsum(-1) - 1).clamp(min=0), _mask(u_mask, P))  # (U, V)
        for kc, vc in zip(self.k, self.v):  # (index_select: 3x faster than [index] on these strided slices)
            kc[:, :, :P], vc[:, :, :P] = kc[:len(uniq), :, :P].index_select(0, index), vc[:len(uniq), :, :P].index_select(0, index)
        return logits.index_select(0, index)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows of the cache (finished rows leave the batch)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.valid = self.valid.index_select(0, rows)

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tok, pos: (B, 1); the new token is a real key for every row (finished rows are ignored)."""
        self.valid[:, self.n] = True
        return self._forward(tok, pos, self.valid[:, None, : self.n + 1])
