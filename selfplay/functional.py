"""A functional Qwen2/Llama forward: plain tensor ops over the weights of a loaded transformers
model. `Decoder` samples with a preallocated KV cache (the sampler's merged copies of the base);
`lora_logits` is the trainer's forward through one peft adapter, with gradients into the LoRA
weights: (W + s·B A) x with the merged weight, as the sampler computes it, and the LoRA gradients
by hand (`_LoraLinear`); each distinct prompt of a batch runs once and its rows share its keys/values.

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

import torch
import torch.nn.functional as F


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


def _mlp(x, layer, eps, linear):
    """The layer's second half: x + SwiGLU MLP of its normed x."""
    h = _rms(x, layer.post_attention_layernorm.weight, eps)
    mlp = layer.mlp
    return x + linear(F.silu(linear(h, mlp.gate_proj)) * linear(h, mlp.up_proj), mlp.down_proj)


def _block(x, layer, cos, sin, H, Hkv, D, eps, allowed, linear, kv=None):
    """One decoder layer. `linear(h, module)` applies a projection (with or without LoRA); `kv`
    (k_cache, v_cache, lo) writes the new keys/values at slot lo and attends over slots [0, hi)."""
    B, T, _ = x.shape
    att = layer.self_attn
    h = _rms(x, layer.input_layernorm.weight, eps)
    q = linear(h, att.q_proj).view(B, T, H, D).transpose(1, 2)
    k = linear(h, att.k_proj).view(B, T, Hkv, D).transpose(1, 2)
    v = linear(h, att.v_proj).view(B, T, Hkv, D).transpose(1, 2)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
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
    x = x + linear(a.transpose(1, 2).reshape(B, T, H * D), att.o_proj)
    return _mlp(x, layer, eps, linear)


def _shared_prompt_block(x, layer, cos, sin, H, Hkv, D, eps, shapes, index, allowed_p, allowed_c, linear):
    """One decoder layer over a flat (N, d) token matrix: the U·P prompt tokens, then the B·C
    completion tokens (`shapes` = ((U, P), (B, C)). Every per-token op (norms, the
    seven projections, rotary, MLP) runs once on all N tokens; only attention is split: the prompts
    attend causally among themselves, and completion row i attends to its prompt index[i]'s
    keys/values, then causally to its own. One op per projection instead of one per half: at this
    model's size the update pays per op as much as per FLOP (elementwise ops, dispatch)."""
    (U, P), (B, C) = shapes
    n_p = U * P
    att = layer.self_attn
    h = _rms(x, layer.input_layernorm.weight, eps)
    q = linear(h, att.q_proj).view(-1, H, D)  # (N, H, D)
    k = linear(h, att.k_proj).view(-1, Hkv, D)
    v = linear(h, att.v_proj)
    q = q * cos + _rotate_half(q) * sin  # cos, sin: (N, 1, D)
    k = k * cos + _rotate_half(k) * sin

    def heads(t, n, rows, T):  # (rows·T, n·D) -> (rows, n, T, D)
        return t.reshape(rows, T, n, D).transpose(1, 2)

    kp, vp = heads(k[:n_p], Hkv, U, P), heads(v[:n_p], Hkv, U, P)
    ap = F.scaled_dot_product_attention(heads(q[:n_p], H, U, P), kp, vp, attn_mask=allowed_p[:, None],
                                        enable_gqa=Hkv != H)  # (U, H, P, D)
    # (_Rows, not [index]: advanced indexing's backward is 10x slower on CPU)
    kc = torch.cat([_Rows.apply(kp, index), heads(k[n_p:], Hkv, B, C)], 2)  # (B, Hkv, P + C, D)
    vc = torch.cat([_Rows.apply(vp, index), heads(v[n_p:], Hkv, B, C)], 2)
    ac = F.scaled_dot_product_attention(heads(q[n_p:], H, B, C), kc, vc, attn_mask=allowed_c[:, None],
                                        enable_gqa=Hkv != H)  # (B, H, C, D)
    a = torch.cat([ap.transpose(1, 2).reshape(n_p, H * D), ac.transpose(1, 2).reshape(B * C, H * D)])  # (N, H·D)
    x = x + linear(a, att.o_proj)
    return _mlp(x, layer, eps, linear)


def _heads(c) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a model config."""
    H = c.num_attention_heads
    return H, c.num_key_value_heads, getattr(c, "head_dim", None) or c.hidden_size // H


def _plain(h: torch.Tensor, mod) -> torch.Tensor:
    return F.linear(h, mod.weight, mod.bias)


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
    current A and B."""

    @staticmethod
    def forward(ctx, x, merged, bias, A, B, scale):
        x2 = x.reshape(-1, x.shape[-1])  # (M, in)
        a = x2 @ A.t()  # (M, r), for dB
        y = x2 @ merged.t() if bias is None else torch.addmm(bias, x2, merged.t())  # (M, out)
        ctx.save_for_backward(x2, a, merged, B)
        ctx.scale, ctx.shape = scale, x.shape
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x2, a, merged, B = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # (M, out)
        g = dy2 @ B  # (M, r)
        dA = (g.t() @ x2).mul_(ctx.scale)  # (r, in)
        dB = (dy2.t() @ a).mul_(ctx.scale)  # (out, r)
        dx = (dy2 @ merged).view(ctx.shape) if ctx.needs_input_grad[0] else None
        return dx, None, None, dA, dB, None


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


def lora_logits(peft_model, adapter: str | None, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                index: torch.Tensor, completion_ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, C, V) predicting each completion token, through `adapter`'s LoRA (None = the
    base), differentiable in the LoRA weights; peft's sum base(x) + B(A(x)) * scaling computed as the
    sampler does, with the merged weight (W + scaling·B A) x (`_LoraLinear`).

    Shared prompts: row i's prompt is prompt_ids[index[i]] ((U, P), left-padded); its completion is
    completion_ids[i] ((B, C), right-padded). Each distinct prompt runs once and its keys/values
    are shared by its rows (the G samples of a group), so the gradient of every row flows back into
    one prompt pass: (U·P + B·C) token-forwards instead of B·(P + C). Prompt and completion tokens
    go through each projection together as one flat (U·P + B·C, d) matrix (`_shared_prompt_block`):
    the learner's update 0.130 → 0.115 s at one thread on 105 rows (medians, README Benchmarks)."""
    from peft.tuners.lora import LoraLayer

    merged = {}  # LoRA module -> W + s·B A, built once per call (28 rank-r products: ~0.3 ms)

    def linear(h, mod):
        if not isinstance(mod, LoraLayer):
            return _plain(h, mod)
        base_layer = mod.get_base_layer()
        if adapter not in mod.lora_A:
            return _plain(h, base_layer)
        A, B, s = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight, mod.scaling[adapter]
        if base_layer.weight.dtype != A.dtype:  # a bf16/fp16 base with fp32 adapters (peft's default):
            # a merged half-precision weight would round small LoRA deltas away, so the LoRA path runs
            # apart in the adapter's dtype and is added in the base's, as peft's forward does
            y = _plain(h, base_layer)
            return y + (F.linear(F.linear(h.to(A.dtype), A), B) * s).to(y.dtype)
        if mod not in merged:
            with torch.no_grad():
                merged[mod] = torch.addmm(base_layer.weight, B, A, alpha=s)
        if not torch.is_grad_enabled():
            return F.linear(h, merged[mod], base_layer.bias)
        return _LoraLinear.apply(h, merged[mod], base_layer.bias, A, B, s)

    base = peft_model.base_model.model
    inner, c = base.model, base.config
    H, Hkv, D = _heads(c)
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
    for layer in inner.layers:
        x = _shared_prompt_block(x, layer, cos, sin, H, Hkv, D, c.rms_norm_eps, ((U, P), (B, C)), index,
                                 allowed_p, allowed_c, linear)
    xp, xc = x[:n_p].view(U, P, -1), x[n_p:].view(B, C, -1)
    h = torch.cat([xp[:, -1].index_select(0, index)[:, None], xc[:, :-1]], 1)  # (B, C, d): the prompt's last position predicts token 0
    return F.linear(_rms(h, inner.norm.weight, c.rms_norm_eps), base.lm_head.weight)


class Decoder:
    """prefill(ids, mask, pos) then step(tok, pos) for up to `max_new` tokens; both return the
    last position's logits (B, V)."""

    def __init__(self, model, batch: int, max_len: int):
        c = model.config
        self.eps = c.rms_norm_eps
        self.H, self.Hkv, self.D = _heads(c)
        inner = model.model
        self.embed, self.norm, self.rotary, self.layers = inner.embed_tokens.weight, inner.norm.weight, inner.rotary_emb, inner.layers
        self.head = model.lm_head.weight
        dev, dt = self.embed.device, self.embed.dtype
        # empty, not zeros (zeroing cost 5% of a rollout): a slot is written before any query reads it
        self.k = [torch.empty(batch, self.Hkv, max_len, self.D, device=dev, dtype=dt) for _ in self.layers]
        self.v = [torch.empty(batch, self.Hkv, max_len, self.D, device=dev, dtype=dt) for _ in self.layers]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=dev)  # key slots holding real tokens
        self.n = 0  # slots filled

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """The first len(ids) rows of the cache take the new tokens."""
        x = F.embedding(ids, self.embed)  # (B, T, d)
        cos, sin = self.rotary(x, pos)  # (B, T, D)
        cos, sin = cos[:, None], sin[:, None]
        n = len(ids)
        for i, layer in enumerate(self.layers):
            x = _block(x, layer, cos, sin, self.H, self.Hkv, self.D, self.eps, allowed, _plain,
                       (self.k[i][:n], self.v[i][:n], self.n))
        self.n += ids.shape[1]
        return F.linear(_rms(x[:, -1], self.norm, self.eps), self.head)  # (B, V)

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
