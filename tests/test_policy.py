"""Policy, sampler and adapters on the real bootstrapped tiny model (1 thread)."""

import math

import pytest
import torch

from selfplay.policy import make_batch
from selfplay.sampler import sample
from selfplay.tokenizer import build_tokenizer, load_tokenizer


def _prompts(policy):
    return [policy.encode(p) for p in ("S:3 7 25>21|", "S:12 4 9 2>40|", "S:5 5>25|H:5*5|", "J:1 2>3|1+2|")]


def _perturb(policy, role, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.adapter_params(role):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_saved_tokenizer_round_trip(base_path):
    mem, disk = build_tokenizer(), load_tokenizer(base_path)
    for s in ("S:3 7 25>21|", "(25-7)+3", "M:1 2 3>6|P:4|", "J:1 2>3|1+2|Y"):
        assert disk(s, add_special_tokens=False)["input_ids"] == mem(s, add_special_tokens=False)["input_ids"]
        assert disk.decode(disk(s, add_special_tokens=False)["input_ids"]) == s


def test_fast_encode_and_decode_equal_transformers(policy):
    # Policy.tokens / decode_batch call the Rust tokenizer directly (transformers' wrapper costs
    # ~40 us of Python per call); the ids and texts must be the wrapper's, for any string and any ids.
    import random

    rng = random.Random(0)
    tok = policy.tokenizer
    alphabet = "0123456789+-*/()= SMHJPY:>|,\n"
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        assert policy.tokens(s) == tok(s, add_special_tokens=False)["input_ids"], s
    rows = [[rng.randrange(len(tok)) for _ in range(rng.randrange(0, 25))] for _ in range(300)]
    assert policy.decode_batch(rows) == [tok.decode(r, skip_special_tokens=True) for r in rows]


def test_greedy_sampler_matches_generate(policy):
    _perturb(policy, "student")  # a non-trivial adapter, so the LoRA path is exercised
    policy.use("student")
    model = policy.model.eval()
    prompts = _prompts(policy)
    ours = sample(model, prompts, max_new_tokens=20, eos_id=policy.eos_id, pad_id=policy.pad_id, temperature=0)
    for p, o in zip(prompts, ours):
        ref = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=20, do_sample=False, pad_token_id=policy.pad_id, eos_token_id=policy.eos_id)
        assert o.ids == ref[0, len(p):].tolist()[: len(o.ids)]
        assert len(o.ids) == 20 or o.ids[-1] == policy.eos_id


def test_mixed_adapter_batch_equals_separate_batches(policy):
    _perturb(policy, "student", 1)
    _perturb(policy, "tutor", 2)
    prompts = _prompts(policy)
    kw = dict(max_new_tokens=12, eos_id=policy.eos_id, pad_id=policy.pad_id, temperature=0)
    mixed = sample(policy.model, prompts * 2, adapter_names=["student"] * 4 + ["tutor"] * 4, **kw)
    s = sample(policy.model, prompts, adapter_names=["student"] * 4, **kw)
    t = sample(policy.model, prompts, adapter_names=["tutor"] * 4, **kw)
    assert [m.ids for m in mixed] == [x.ids for x in s + t]
    assert [m.ids for m in mixed[:4]] != [m.ids for m in mixed[4:]]  # the adapters really differ


def test_student_update_leaves_tutor_bit_identical(policy):
    from selfplay.trainer import Row, Trainer

    tutor_before = [p.detach().clone() for p in policy.adapter_params("tutor")]
    student_before = [p.detach().clone() for p in policy.adapter_params("student")]
    tr = Trainer(policy, policy.cfg)
    p = policy.encode("S:3 7 25>21|")
    rows = [Row(p, policy.encode("(25-7)+3") + [policy.eos_id], 1.0), Row(p, policy.encode("25+7+3") + [policy.eos_id], -1.0)]
    tr.step("student", rows, 40)
    assert all(torch.equal(a, b) for a, b in zip(tutor_before, policy.adapter_params("tutor")))
    assert not all(torch.equal(a, b) for a, b in zip(student_before, policy.adapter_params("student")))


def test_save_load_round_trip_reproduces_logprobs(policy, base_path, tmp_path):
    from selfplay.policy import Policy

    _perturb(policy, "student", 3)
    _perturb(policy, "tutor", 4)
    b = make_batch(_prompts(policy), [policy.encode("(25-7)+3"), policy.encode("1+2"), policy.encode("5*5"),
                                      policy.encode("Y")], policy.pad_id)
    with torch.no_grad():
        want = {r: policy.logprobs(b, r) for r in ("student", "tutor")}
    policy.save_adapters(tmp_path / "adapters")
    assert (tmp_path / "adapters" / "tutor" / "adapter_model.safetensors").is_file()
    fresh = Policy(policy.cfg, base_path)
    fresh.load_adapters(tmp_path / "adapters")
    with torch.no_grad():
        for r in ("student", "tutor"):
            assert torch.allclose(fresh.logprobs(b, r), want[r], atol=1e-6)


def test_ref_logprobs_are_the_base(policy, base_path):
    from transformers import AutoModelForCausalLM

    _perturb(policy, "student", 5)
    b = make_batch(_prompts(policy)[:2], [policy.encode("(25-7)+3"), policy.encode("(12*4)-9-2")], policy.pad_id)
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = base(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos).logits[:, -b.C - 1:-1]
        want = logits.log_softmax(-1).gather(-1, b.input_ids[:, -b.C:, None]).squeeze(-1)
        assert torch.allclose(policy.ref_logprobs(b) * b.completion_mask, want * b.completion_mask, atol=1e-5)
        assert not torch.allclose(policy.logprobs(b, "student") * b.completion_mask, want * b.completion_mask, atol=1e-3)


def test_padding_does_not_change_logprobs(policy):
    # the same row scored alone and next to a longer row (more left/right padding) must agree
    p1, c1 = policy.encode("S:3 7 25>21|"), policy.encode("(25-7)+3")
    p2, c2 = policy.encode("S:12 4 9 2>40|H:12*4|"), policy.encode("((12*4)-9)-2")
    with torch.no_grad():
        alone = policy.logprobs(make_batch([p1], [c1], policy.pad_id), "student")[0, : len(c1)]
        mixed = policy.logprobs(make_batch([p1, p2], [c1, c2], policy.pad_id), "student")[0, : len(c1)]
    assert torch.allclose(alone, mixed, atol=1e-5)


def test_merged_generation_backend_matches_peft(policy):
    from selfplay.generator import TorchBackend

    _perturb(policy, "student", 6)
    _perturb(policy, "tutor", 7)
    prompts = _prompts(policy) * 2
    adapters = ["student"] * 4 + ["tutor"] * 4
    backend = TorchBackend(policy, 1.0, 0, seed=0)  # merges the current adapters into generation copies
    ours = backend.complete(prompts, adapters, [12] * 8, temperature=0)
    ref = sample(policy.model, prompts, max_new_tokens=12, eos_id=policy.eos_id, pad_id=policy.pad_id,
                 temperature=0, adapter_names=adapters)
    assert [o.ids for o in ours] == [r.ids for r in ref]
    for o, r in zip(ours, ref):
        assert o.logprobs == __import__("pytest").approx(r.logprobs, abs=1e-4)


def test_compacted_batch_gives_the_same_tokens_and_logprobs(policy):
    # The functional decoder drops finished rows once half the live rows are done. Four rows cut at
    # 2 tokens and one EOS force that after step 2; the three rows decoding on must match the
    # uncompacted peft path token for token (greedy), and sampled rows' behaviour log-probs must
    # equal the trainer's.
    from selfplay.generator import TorchBackend

    _perturb(policy, "student", 9)
    prompts = _prompts(policy) * 2
    caps = [2, 2, 2, 2, 16, 16, 16, 16]  # four rows done after step 2: the first compaction
    backend = TorchBackend(policy, 1.0, 0, seed=0)  # the policy's own sampling distribution
    ours = backend.complete(prompts, ["student"] * 8, caps, temperature=0)
    ref = sample(policy.model, prompts, max_new_tokens=caps, eos_id=policy.eos_id, pad_id=policy.pad_id,
                 temperature=0, adapter_names=["student"] * 8)
    # (the greedy lengths depend on the machine's bootstrapped base: 6, 12, 6, 2 on one, 6, 8, 6, 2 on
    # another) at least two rows outlive the first compaction and end apart, so a second one happens
    long = [len(o.ids) for o in ours if len(o.ids) > 2]
    assert len(long) >= 2 and len(set(long)) >= 2, long
    assert [o.ids for o in ours] == [r.ids for r in ref]
    for o, r in zip(ours, ref):
        assert o.logprobs == __import__("pytest").approx(r.logprobs, abs=1e-4)
    sampled = backend.complete(prompts, ["student"] * 8, caps)
    b = make_batch(prompts, [o.ids for o in sampled], policy.pad_id)
    with torch.no_grad():
        lp = policy.logprobs(b, "student")
    for i, o in enumerate(sampled):
        assert lp[i, : len(o.ids)].tolist() == __import__("pytest").approx(o.logprobs, abs=1e-4)


def test_row_cut_at_its_cap_gets_no_pad_as_eos(policy):
    # pad == EOS, as in many real tokenizers (SmolLM2): row 0 is cut at 2 tokens while row 1 decodes
    # on, so row 0 is padded with the EOS id afterwards; that pad must not become its "EOS".
    prompts = _prompts(policy)[:2]
    outs = sample(policy.model, prompts, max_new_tokens=[2, 12], eos_id=policy.eos_id, pad_id=policy.eos_id,
                  temperature=0)
    assert len(outs[1].ids) > 2, "row 1 must outlive row 0 for the test to mean anything"
    assert len(outs[0].ids) == 2 and policy.eos_id not in outs[0].ids and outs[0].finished is False


def test_trainer_scores_under_the_sampling_distribution(base_path):
    # At T = 0.7 with top-k 5 the trainer used to score at T = 1 without the filter (0.1 nats/token
    # off): the ratio to the behaviour policy was not 1 at the weights that sampled.
    from selfplay.policy import Policy
    from tests.conftest import tiny_config

    pol = Policy(tiny_config(**{"generation.temperature": 0.7, "generation.top_k": 5}), base_path)
    _perturb(pol, "student", 8)
    pol.use("student")
    prompts = _prompts(pol)
    outs = sample(pol.model, prompts, max_new_tokens=12, eos_id=pol.eos_id, pad_id=pol.pad_id, temperature=0.7,
                  top_k=5, generator=torch.Generator().manual_seed(0))
    b = make_batch(prompts, [o.ids for o in outs], pol.pad_id)
    with torch.no_grad():
        lp = pol.logprobs(b, "student")
    for i, o in enumerate(outs):
        assert lp[i, : len(o.ids)].tolist() == __import__("pytest").approx(o.logprobs, abs=1e-4)


def test_chat_template_encoding_gives_token_ids(base_path):
    # transformers 5's apply_chat_template(tokenize=True) returns a BatchEncoding unless
    # return_dict=False: Policy.encode used to hand the generator a dict instead of ids
    from selfplay.policy import Policy
    from tests.conftest import tiny_config

    pol = Policy(tiny_config(**{"model.chat_template": True}), base_path)
    pol.tokenizer.chat_template = ("{% for m in messages %}U:{{ m['content'] }}|{% endfor %}"
                                   "{% if add_generation_prompt %}A:{% endif %}")
    ids = pol.encode("3 7 25>21")
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids == pol.tokenizer("U:3 7 25>21|A:", add_special_tokens=False)["input_ids"]


def test_functional_decoder_equals_the_model_forward(base_path):
    # the sampler's decoder (plain tensor ops, preallocated KV cache) against transformers' forward
    # with a DynamicCache: left-padded rows (0..5 pads, three of them repeated), a prefill and 8
    # decode steps
    from transformers import AutoModelForCausalLM, DynamicCache

    from selfplay.functional import Decoder, supports

    m = AutoModelForCausalLM.from_pretrained(base_path).eval()
    assert supports(m)
    B, P, N = 6, 9, 8
    ids = torch.randint(5, 200, (B, P), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, P, dtype=torch.long)
    for b in range(B):
        mask[b, :b], ids[b, :b] = 0, 0
    ids, mask, B = torch.cat([ids, ids[[1, 3, 3]]]), torch.cat([mask, mask[[1, 3, 3]]]), B + 3  # repeated prompts prefill once
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        dec, cache = Decoder(m, B, P + N), DynamicCache(config=m.config)
        ours = dec.prefill(ids, mask, pos)
        theirs = m(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]
        for _ in range(N):
            assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
            tok, pos = theirs.argmax(-1)[:, None], pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
            ours = dec.step(tok, pos)
            theirs = m(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits[:, -1]


def test_functional_lora_forward_equals_peft_in_logprobs_and_gradients(policy):
    # the trainer's functional forward (W x + s·B(A x) as plain ops, each distinct prompt run once and
    # shared by its rows) against peft's module forward on the full rows: same per-token log-probs for
    # each adapter and the base, and the same LoRA gradients
    from selfplay.functional import lora_logits

    _perturb(policy, "student")
    _perturb(policy, "tutor", seed=1)
    p = _prompts(policy)
    prompts = [p[0], p[1], p[0], p[2], p[0]]  # three rows share one prompt, as a GRPO group's do
    comps = [[7, 8, 9, policy.eos_id], [10, policy.eos_id], [11, 12, 13, 14, 15], [7, policy.eos_id], [9]]
    b = make_batch(prompts, comps, policy.pad_id)
    pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
    P = b.input_ids.shape[1] - b.C
    uniq, index = torch.unique(torch.cat([b.input_ids[:, :P], b.attention_mask[:, :P]], 1), dim=0, return_inverse=True)
    assert len(uniq) == 3
    m = policy.model
    for role in ("student", "tutor", None):
        name = policy.adapters[role] if role else None
        params = policy.adapter_params(role) if role else []
        if role:
            policy.use(role)  # as the trainer does: the role's adapter is the trainable one
        ours = lora_logits(m, name, uniq[:, :P], uniq[:, P:], index, b.input_ids[:, P:]).log_softmax(-1)
        if role:
            theirs = m(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos,
                       logits_to_keep=b.C + 1).logits[:, :-1].log_softmax(-1)
        else:
            with m.disable_adapter():
                theirs = m(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos,
                           logits_to_keep=b.C + 1).logits[:, :-1].log_softmax(-1)
        real = b.completion_mask.bool()  # pad positions' outputs are never used
        assert torch.allclose(ours[real], theirs[real], atol=1e-5), (role, (ours[real] - theirs[real]).abs().max())
        if params:
            g_theirs = torch.autograd.grad(theirs[..., 5].masked_fill(~real, 0).sum(), params)
            g_ours = torch.autograd.grad(ours[..., 5].masked_fill(~real, 0).sum(), params)
            for a, c in zip(g_ours, g_theirs):
                # relative to the gradient's norm: the shared prompt sums its rows' gradients in another
                # order (measured <= 3e-6 on one machine's bootstrapped base, 1.1e-5 on another's; a
                # wrong mask or position is off by far more)
                assert float((a - c).norm()) <= 1e-4 * float(c.norm()) + 1e-7, (role, float((a - c).norm() / c.norm()))


def test_bf16_base_with_fp32_adapters_trains_like_peft(base_path):
    # A half-precision base with peft's fp32 adapters (configs/qwen-gpu.yaml) crashed the functional
    # forward (bf16 x fp32 matmul). Its LoRA path now runs in fp32 beside the bf16 base, as peft's
    # does (a merged bf16 weight would round small deltas away), so log-probs and LoRA gradients
    # agree with peft's to bf16 rounding; the merged-copy sampler takes peft's delta weight.
    from selfplay.generator import TorchBackend
    from selfplay.policy import Policy
    from tests.conftest import tiny_config

    pol = Policy(tiny_config(**{"model.dtype": "bfloat16"}), base_path)
    _perturb(pol, "student")
    pol.use("student")
    params = pol.adapter_params("student")
    assert params[0].dtype == torch.float32
    p = _prompts(pol)
    b = make_batch([p[0], p[0], p[1]], [[7, 8, pol.eos_id], [9, pol.eos_id], [10, 11]], pol.pad_id)
    real = b.completion_mask.bool()
    ours = pol.logprobs(b, "student")  # the functional forward
    pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
    theirs = pol.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos,
                       logits_to_keep=b.C + 1).logits[:, :-1].float().log_softmax(-1)
    theirs = theirs.gather(-1, b.input_ids[:, -b.C:, None]).squeeze(-1)
    # bf16 rounding moves these log-probs (~ -10) by up to ~0.05 between two summation orders;
    # the perturbed adapter moves them by up to ~1.1, so a dropped LoRA path fails here
    assert torch.allclose(ours[real], theirs[real], atol=0.2), (ours - theirs)[real].abs().max()
    g_ours = torch.autograd.grad(ours[real].sum(), params)
    g_theirs = torch.autograd.grad(theirs[real].sum(), params)
    # the exact gradients: the same adapter on the float32 base, through peft. How far a bf16
    # gradient lands from them depends on the CPU's bf16 kernels and the summation order: ours
    # attends to a shared prompt's keys through a concatenation, transformers runs one SDPA per
    # row. Measured: within 1.1% of peft's with AVX-512 BF16; on an AVX2-only CPU peft's own bf16
    # gradients are within 2.6% of the exact ones and ours within 7.2% (the last layer's q/k,
    # 1-3% elsewhere). A dropped LoRA path or a wrong scale is off by about the whole norm.
    exact = Policy(tiny_config(), base_path)
    exact.set_adapter_vector("student", pol.adapter_vector("student").float())
    exact.use("student")
    ref = exact.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos,
                      logits_to_keep=b.C + 1).logits[:, :-1].log_softmax(-1)
    ref = ref.gather(-1, b.input_ids[:, -b.C:, None]).squeeze(-1)
    g_exact = torch.autograd.grad(ref[real].sum(), exact.adapter_params("student"))
    for a, c, e in zip(g_ours, g_theirs, g_exact):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        assert float((a - e).norm()) <= 0.1 * float(e.norm()) + 1e-6
        assert float((c - e).norm()) <= 0.1 * float(e.norm()) + 1e-6  # the reference is bf16-close too
    out = TorchBackend(pol, 1.0, 0, 0).complete([p[0]], ["student"], [4])[0]  # merged bf16 copies build
    assert len(out.ids) >= 1 and all(math.isfinite(x) for x in out.logprobs)


def test_hindsight_rows_add_only_their_weighted_token_nll(base_path):
    # Loss of a batch = the PG rows' loss + λ_H · (−Σ log p of the hindsight tokens) / their count.
    # With one PG row whose advantage is 0 (ratio 1: its loss is exactly 0) and two hindsight rows of
    # 3 and 2 tokens, the loss must be λ_H · (−Σ over the 5 tokens) / 5, with λ_H = 2.
    import pytest

    from selfplay.policy import Policy
    from selfplay.trainer import Row, Trainer
    from tests.conftest import tiny_config

    cfg = tiny_config(**{"trainer.hindsight_nll": 2.0})
    pol = Policy(cfg, base_path)
    p1, p2 = pol.encode("S:3 7 25>21|"), pol.encode("S:3 7 25>11|")
    c1, c2 = pol.tokenizer("3+25-7", add_special_tokens=False)["input_ids"], pol.tokenizer("3+7", add_special_tokens=False)["input_ids"]
    assert (len(c1), len(c2)) == (5, 3)
    c1, c2 = c1[:3], c2[:2]
    b = make_batch([p1, p2], [c1, c2], pol.pad_id)
    with torch.no_grad():
        lp = pol.logprobs(b, "student")
    nll = -(lp[0, :3].sum() + lp[1, :2].sum()).item() / 5
    rows = [Row(p1, c1, 0.0, None), Row(p1, c1, 0.0, [0.0] * 3, 3, hindsight=True),
            Row(p2, c2, 0.0, [0.0] * 2, 2, hindsight=True)]
    m = Trainer(pol, cfg).step("student", rows, cfg.generation.max_new_tokens)
    assert m["student/loss"] == pytest.approx(2.0 * nll, rel=1e-5)
    assert m["student/grad_norm"] > 0  # the NLL term moves the adapter


def test_hint_only_row_trains_like_the_flat_groups_solved_attempts(base_path):
    # A flat hinted group (advantage 0) whose 3 attempts all solved: each attempt's loss is only
    # λ · NLL of its 2 forced hint tokens (its sampled rest has advantage 0). One row of just the
    # hint with weight 3 must give the same gradient: the NLL normaliser is 3·2 = 6 tokens either way,
    # so λ · 3·(−Σ log p(hint)) / 6 = λ · (−Σ log p(hint)) / 2.
    # Beside a policy-gradient row, the hint-only row adds exactly that term: it has no sampled
    # token, so the PG normaliser (sampled tokens) is the PG row's alone.
    import pytest

    from selfplay.policy import Policy
    from selfplay.trainer import Row, Trainer
    from tests.conftest import tiny_config

    cfg = tiny_config(**{"trainer.hint_nll": 0.5, "trainer.max_grad_norm": 1e9})
    pol = Policy(cfg, base_path)
    p = pol.encode("S:3 7 25>21|")
    hint = pol.tokenizer("3+", add_special_tokens=False)["input_ids"]
    rests = [pol.tokenizer(s, add_special_tokens=False)["input_ids"] + [pol.eos_id] for s in ("25-7", "25-7*1", "7+25")]
    assert len(hint) == 2
    b = make_batch([p], [hint], pol.pad_id)
    with torch.no_grad():
        nll = -pol.logprobs(b, "student")[0, :2].sum().item() / 2

    def update(rows):
        pol = Policy(cfg, base_path)
        m = Trainer(pol, cfg).step("student", rows, cfg.generation.max_new_tokens)
        return m, torch.cat([w.grad.flatten() for w in pol.adapter_params("student")])  # left after the step

    full = [Row(p, hint + r, 0.0, [0.0] * (2 + len(r)), 2, True) for r in rests]
    merged = [Row(p, hint, 0.0, [0.0, 0.0], 2, True, weight=3)]
    (m_full, g_full), (m_merged, g_merged) = update(full), update(merged)
    assert m_merged["student/loss"] == pytest.approx(0.5 * nll, rel=1e-5)
    assert m_full["student/loss"] == pytest.approx(0.5 * nll, rel=1e-5)
    assert g_merged.norm() > 0
    assert (g_full - g_merged).norm() <= 1e-5 * g_merged.norm()
    pg = Row(p, pol.tokenizer("25-7+3", add_special_tokens=False)["input_ids"] + [pol.eos_id], 1.0, None)
    m_pg, _ = update([pg])
    m_both, _ = update([pg, *merged])
    assert m_both["student/loss"] == pytest.approx(m_pg["student/loss"] + 0.5 * nll, rel=1e-5)


def test_kl_only_rows_pull_the_tutor_to_its_prior_without_diluting_the_policy_gradient(base_path):
    # A tutor moved off its prior (perturbed adapter). Rows: one PG row (advantage 1, behaviour =
    # current log-probs, so ratio 1 and each sampled token's loss is -1: the PG term is -1 as a
    # token mean) and one KL-only row (pg=False, a zero-variance group). With tutor_kl_coef c the
    # loss must be -1 + c · (Σ k3 over the sampled tokens of BOTH rows) / (their count): the
    # KL-only row's tokens are in the KL's normaliser, not in the PG's (else the PG term would be
    # -1 · 2/6). And updates on KL-only rows alone must lower that KL.
    import pytest

    from selfplay.policy import Policy
    from selfplay.trainer import Row, Trainer
    from tests.conftest import tiny_config

    # a small step: AdamW's first steps move every LoRA weight by ~lr, and at 1e-2 (or 3e-3) one such
    # step sent this KL from 0.4 to 3e3-1e5 on one machine's base while another's happened to fall
    cfg = tiny_config(**{"trainer.tutor_kl_coef": 0.5, "trainer.max_grad_norm": 1e9, "trainer.tutor_lr": 1e-4})
    pol = Policy(cfg, base_path)
    _perturb(pol, "tutor")
    p = pol.encode("S:5 5>25|H:5*5|")
    c1 = pol.tokenizer("12", add_special_tokens=False)["input_ids"] + [pol.eos_id]  # a reveal count
    c2 = pol.tokenizer("3+3+", add_special_tokens=False)["input_ids"]
    assert (len(c1), len(c2)) == (2, 4)
    b = make_batch([p, p], [c1, c2], pol.pad_id)

    def kl_of():  # Σ k3 over the 2 + 4 sampled tokens / 6, by the formula, from both forwards
        with torch.no_grad():
            d = pol.ref_logprobs(b) - pol.logprobs(b, "tutor")
        k3 = (torch.exp(d) - d - 1) * b.completion_mask
        return k3.sum().item() / 6

    kl0 = kl_of()
    assert kl0 > 0
    with torch.no_grad():
        old = pol.logprobs(b, "tutor")[0, : len(c1)].tolist()
    tr = Trainer(pol, cfg)
    m = tr.step("tutor", [Row(p, c1, 1.0, old), Row(p, c2, 0.0, None, pg=False)], 8)
    assert m["tutor/loss"] == pytest.approx(-1.0 + 0.5 * kl0, rel=1e-4)
    assert m["tutor/kl"] == pytest.approx(kl0, rel=1e-4)
    kl1 = kl_of()
    tr = Trainer(pol, cfg)  # a fresh optimizer: Adam's momentum would carry the PG row's push off the prior
    for _ in range(3):
        tr.step("tutor", [Row(p, c1, 0.0, None, pg=False), Row(p, c2, 0.0, None, pg=False)], 8)
    assert kl_of() < 0.8 * kl1
    # without the KL the same rows carry nothing to train
    assert Trainer(pol, tiny_config()).step("tutor", [Row(p, c2, 0.0, None, pg=False)], 8) == {}


def test_length_buckets_give_the_same_update(base_path):
    # Cutting the sorted rows into two micro-batches changes only the summation order: the summed
    # gradient equals the one-batch gradient to float rounding.
    from selfplay.policy import Policy
    from selfplay.trainer import Row, Trainer
    from tests.conftest import tiny_config

    grads = []
    for buckets in (False, True):
        cfg = tiny_config(**{"trainer.length_buckets": buckets, "trainer.max_grad_norm": 1e9})
        pol = Policy(cfg, base_path)
        _perturb(pol, "student", 3)
        p = _prompts(pol)
        g = torch.Generator().manual_seed(1)
        rows = [Row(p[i % 4], torch.randint(5, 200, (n,), generator=g).tolist(), float(torch.randn(1, generator=g)),
                    None) for i, n in enumerate([6] * 12 + [16] * 2)]
        Trainer(pol, cfg).step("student", rows, cfg.generation.max_new_tokens)
        grads.append(torch.cat([q.grad.flatten() for q in pol.adapter_params("student")]))
    assert float((grads[0] - grads[1]).norm()) <= 1e-5 * float(grads[0].norm())


def test_inverse_cdf_draw_takes_the_first_token_whose_cdf_reaches_u():
    from selfplay.sampler import draw

    # probs 1/8, 0, 5/8, 1/4 -> cdf 0.125, 0.125, 0.75, 1.0 (by hand): u below 0.125 -> token 0;
    # between 0.125 and 0.75 -> 2 (token 1 has probability 0 and is never drawn, though its cdf
    # equals token 0's); above -> 3; u = 0 is clamped to > 0, so it still draws token 0
    logp = torch.tensor([[0.125, 0.0, 0.625, 0.25]]).log().expand(7, 4)
    u = torch.tensor([[0.05], [0.12], [0.13], [0.5], [0.74], [0.95], [0.0]])
    assert draw(logp, u).tolist() == [0, 0, 2, 2, 2, 3, 0]
    # the same tokens as counting the cdf entries below the threshold (the sampler's former rule),
    # on random rows with zero-probability tokens (top-k masking)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 50, generator=g).masked_fill(torch.rand(256, 50, generator=g) < 0.5, float("-inf"))
    logits[:, 0] = 0.0  # every row keeps at least one token
    lp, u = logits.log_softmax(-1), torch.rand(256, 1, generator=g)
    cdf = lp.exp().cumsum(-1)
    assert torch.equal(draw(lp, u), (cdf < u.clamp(min=1e-12) * cdf[:, -1:]).sum(-1).clamp(max=49))
    assert bool((lp.gather(1, draw(lp, u)[:, None]) > float("-inf")).all())


def test_top_k_scoring_keeps_the_nll_terms_finite(base_path):
    # With generation.top_k the ratio's log-probs are the sampler's: -inf outside the top k, and
    # inside it x_t - logsumexp(top k), which is the old rule (filter the tempered logits, then
    # log_softmax). The NLL terms' targets were not sampled (a hint, an attempt under a relabelled
    # prompt), so they take the tempered log-probs without the filter: a target outside the top k
    # has a finite NLL and the update runs (before, its -inf made the loss infinite and the
    # non-finite guard dropped the whole update).
    from selfplay.policy import Policy, sampling_logits
    from selfplay.trainer import Row, Trainer
    from tests.conftest import tiny_config

    cfg = tiny_config(**{"generation.top_k": 2, "generation.temperature": 0.7, "trainer.hindsight_nll": 3.0})
    pol = Policy(cfg, base_path)
    _perturb(pol, "student")
    p = _prompts(pol)
    completion = [7, 8, 9, pol.eos_id]  # arbitrary tokens: some fall outside the top 2
    b = make_batch([p[0]], [completion], pol.pad_id)
    kept, tempered = pol.train_logprobs(b, "student")
    pol.use("student")
    pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = pol.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=pos,
                       logits_to_keep=b.C + 1).logits[:, :-1].float()
    target = b.input_ids[:, -b.C:, None]
    old_rule = sampling_logits(logits, 0.7, 2).log_softmax(-1).gather(-1, target).squeeze(-1)
    assert torch.equal(torch.isinf(kept), torch.isinf(old_rule)) and torch.isinf(kept).any()
    fin = torch.isfinite(old_rule)
    assert torch.allclose(kept[fin], old_rule[fin], atol=1e-5)
    assert torch.allclose(tempered, (logits / 0.7).log_softmax(-1).gather(-1, target).squeeze(-1), atol=1e-5)
    before = pol.adapter_vector("student").clone()
    m = Trainer(pol, cfg).step("student", [Row(p[0], completion, 0.0, [0.0] * 4, 4, hindsight=True)], 24)
    assert "student/skipped_update" not in m and math.isfinite(m["student/loss"])
    assert not torch.equal(pol.adapter_vector("student"), before)  # the relabelled row trained


def _gqa_peft_model(target_modules):
    """A random Qwen2 with 4 query heads over 2 key/value heads (the embedded base has no GQA;
    SmolLM2 has) under a LoRA whose B is not zero (peft starts it at 0: the identity)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return pm


def _lora_grads(pm, logprobs):
    return torch.autograd.grad(logprobs[..., 5].sum(), [p for n, p in pm.named_parameters() if "lora_" in n])


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_functional_lora_forward_with_grouped_query_attention_equals_peft(targets):
    # left-padded prompts shared by two rows, against peft's module forward on the full rows; with
    # LoRA on q and v only, the stacked q/k/v projection splits into one part per projection
    from selfplay.functional import lora_logits

    pm = _gqa_peft_model(targets)
    prompt_ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    index, comp = torch.tensor([0, 1, 0]), torch.tensor([[13, 14, 15], [16, 17, 18], [19, 20, 21]])
    ours = lora_logits(pm, "default", prompt_ids, prompt_mask, index, comp).log_softmax(-1)  # (3, 3, V)
    mask = torch.cat([prompt_mask[index], torch.ones(3, 3, dtype=torch.long)], 1)
    theirs = pm(input_ids=torch.cat([prompt_ids[index], comp], 1), attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, 4:-1].log_softmax(-1)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    for a, c in zip(_lora_grads(pm, ours), _lora_grads(pm, theirs)):  # the shared prompt sums in another order
        assert float((a - c).norm()) <= 1e-4 * float(c.norm()) + 1e-7


def test_compiled_train_forward_equals_eager_and_compiles_once():
    # trainer.compile: the layers under torch.compile give the eager forward's log-probs and LoRA
    # gradients, and batches of other sizes (prompts, rows, lengths, one of each) reuse the one
    # compiled graph (a dimension left static, or specialised at 1, would recompile: ~15-50 s each)
    from torch._dynamo.utils import counters

    from selfplay.functional import lora_logits

    pm = _gqa_peft_model("all-linear")
    torch._dynamo.reset()
    counters.clear()
    batches = [(torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]]), torch.tensor([[0, 0, 1, 1, 1], [1] * 5]),
                torch.tensor([0, 1, 0]), torch.tensor([[13, 14, 15], [16, 17, 18], [19, 20, 21]])),
               (torch.tensor([[0, 5, 6], [8, 9, 10], [1, 2, 3]]), torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]]),
                torch.tensor([0, 1, 2, 2, 0]), torch.randint(1, 50, (5, 6))),
               (torch.tensor([[3, 4]]), torch.tensor([[1, 1]]), torch.tensor([0]), torch.tensor([[7]]))]  # sizes of 1
    for prompt_ids, prompt_mask, index, comp in batches:
        eager = lora_logits(pm, "default", prompt_ids, prompt_mask, index, comp).log_softmax(-1)
        compiled = lora_logits(pm, "default", prompt_ids, prompt_mask, index, comp, compile=True).log_softmax(-1)
        assert torch.allclose(compiled, eager, atol=1e-5), (compiled - eager).abs().max()
        for a, c in zip(_lora_grads(pm, compiled), _lora_grads(pm, eager)):
            assert float((a - c).norm()) <= 1e-4 * float(c.norm()) + 1e-7
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compile_without_a_cxx_compiler_is_a_one_line_error(policy, monkeypatch):
    # inductor builds C++ kernels: with no compiler on PATH the run stops at start with what to do,
    # not with inductor's traceback on the first update or decode step
    import selfplay.functional as functional
    from selfplay.generator import TorchBackend
    from selfplay.trainer import Trainer

    monkeypatch.setattr(functional.shutil, "which", lambda name: None)
    cfg = policy.cfg.model_copy(update={"trainer": policy.cfg.trainer.model_copy(update={"compile": True})})
    with pytest.raises(RuntimeError, match="needs a C.. compiler.*trainer.compile=false"):
        Trainer(policy, cfg)
    with pytest.raises(RuntimeError, match="needs a C.. compiler.*generation.compile=false"):
        TorchBackend(policy, 1.0, 0, seed=0, compile=True)
    Trainer(policy, policy.cfg)  # compile off: no compiler needed


def test_compiled_decode_samples_the_eager_tokens_in_one_graph(policy):
    # generation.compile: the decode steps under torch.compile draw what the eager decoder draws
    # (the same RNG stream, log-probs equal to rounding), through batches that shrink as rows finish,
    # other batch sizes, prompt lengths and caps, sampled and greedy: all of it one compiled graph
    # (a size specialised at its first value would recompile, ~8-25 s each)
    from torch._dynamo.utils import counters

    from selfplay.generator import TorchBackend

    _perturb(policy, "student", 9)
    prompts = _prompts(policy) * 2
    eager, compiled = TorchBackend(policy, 1.0, 0, seed=0), TorchBackend(policy, 1.0, 0, seed=0, compile=True)
    torch._dynamo.reset()
    counters.clear()
    d = policy.model.config.hidden_size  # a batch as large as the model's width first: dynamo's "duck shaping"
    calls = [(prompts * (d // 8), [16] * d, None),  # gives equal sizes one symbol, and a smaller batch recompiled
             (prompts, [2, 2, 2, 2, 16, 16, 16, 16], None), (prompts[:3], [12] * 3, 0.0), (prompts[1:] * 3, [10] * 21, None)]
    for batch, caps, temperature in calls:
        ours = compiled.complete(batch, ["student"] * len(batch), caps, temperature=temperature)
        ref = eager.complete(batch, ["student"] * len(batch), caps, temperature=temperature)
        assert [o.ids for o in ours] == [r.ids for r in ref]
        assert max(len(o.ids) for o in ours) > 2  # decode steps ran
        for o, r in zip(ours, ref):
            assert o.logprobs == pytest.approx(r.logprobs, abs=1e-4)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_trainer_warm_up_compiles_the_update_and_changes_nothing(policy):
    # the learner compiles before its first update (while the main process evaluates the base): the
    # warm-up's graph must be the one real updates use, and it must not touch the adapter or optimizer
    from torch._dynamo.utils import counters

    from selfplay.trainer import Row, Trainer

    cfg = policy.cfg.model_copy(update={"trainer": policy.cfg.trainer.model_copy(update={"compile": True})})
    policy.cfg, saved_cfg = cfg, policy.cfg
    before = policy.adapter_vector("student").clone()
    try:
        trainer = Trainer(policy, cfg)
        torch._dynamo.reset()
        counters.clear()
        trainer.warm_up("student")
        assert counters["stats"]["unique_graphs"] == 1
        assert torch.equal(policy.adapter_vector("student"), before)
        assert all(p.grad is None for p in policy.adapter_params("student")) and not trainer.opt["student"].state
        p = policy.encode("reach 7 from 3 4")
        rows = [Row(p, policy.tokens("3+4=7") + [policy.eos_id], 1.0), Row(p, policy.tokens("3*4"), -1.0),
                Row(policy.encode("reach 2 from 1 1"), policy.tokens("1+1=2"), 0.5)]
        trainer.step("student", rows, 8)
        assert counters["stats"]["unique_graphs"] == 1  # the update reused the warm-up's graph
        assert not torch.equal(policy.adapter_vector("student"), before)
    finally:
        policy.cfg = saved_cfg
        policy.set_adapter_vector("student", before)
