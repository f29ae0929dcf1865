import math

import pytest
import torch

from selfplay.grpo import aggregate, class_balanced, group_advantages, kl_penalty, per_token_loss


def test_group_advantages_by_hand():
    # group a: rewards [1, 0, 0, 0]: mean 0.25, unbiased std sqrt((0.75² + 3·0.25²)/3) = sqrt(0.25) = 0.5
    #   -> A = [0.75, -0.25, -0.25, -0.25] / 0.5 = [1.5, -0.5, -0.5, -0.5]
    # group b: rewards [1, 1] -> zero variance: A = 0, dropped
    # group c: a single reward -> no baseline: dropped
    adv, keep = group_advantages([1, 0, 0, 0, 1, 1, 0.3], ["a", "a", "a", "a", "b", "b", "c"])
    assert adv[:4] == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    assert keep == [True] * 4 + [False] * 3
    # Dr.GRPO (no std scaling): A = r - mean = [0.75, -0.25, -0.25, -0.25]
    adv, _ = group_advantages([1, 0, 0, 0], ["a"] * 4, scale_std=False)
    assert adv == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_groups_never_mix_roles_or_kinds():
    # same group id, different (role, kind) keys: each pair is its own group
    adv, keep = group_advantages([1, 0, 5, 3], [("student", "attempt", "g"), ("student", "attempt", "g"),
                                                ("tutor", "hint", "g"), ("tutor", "hint", "g")], scale_std=False)
    assert adv == pytest.approx([0.5, -0.5, 1.0, -1.0])


def test_clipped_loss_by_hand():
    # one row, two tokens; logp - old = [log 1.5, log 0.5] -> ratios [1.5, 0.5]
    lp = torch.log(torch.tensor([[1.5, 0.5]]))
    old = torch.zeros(1, 2)
    # A = +1: token 1: min(1.5, clip(1.5, 0.8, 1.28)=1.28) = 1.28 -> loss -1.28
    #         token 2: min(0.5, clip(0.5)=0.8) = 0.5 -> loss -0.5
    loss, st = per_token_loss(lp, old, torch.tensor([1.0]), 0.2, 0.28)
    assert loss.tolist()[0] == pytest.approx([-1.28, -0.5])
    assert st["clip_frac"].tolist() == [[1.0, 0.0]]
    # A = -1: token 1: min(-1.5, -1.28) = -1.5 -> loss 1.5; token 2: min(-0.5, -0.8) = -0.8 -> loss 0.8
    loss, _ = per_token_loss(lp, old, torch.tensor([-1.0]), 0.2, 0.28)
    assert loss.tolist()[0] == pytest.approx([1.5, 0.8])


def test_k3_kl_by_hand():
    # token 1: ref - logp = d = log 2 -> k3 = e^d - d - 1 = 2 - log 2 - 1 = 0.30685
    # token 2: d = 0 -> k3 = 0; token 3 is masked (padding). The full batch has 4 such tokens
    # (another micro-batch holds the other two): term = (0.30685 + 0) / 4 = 0.07671
    lp = torch.zeros(1, 3)
    ref = torch.tensor([[math.log(2), 0.0, 5.0]])
    term, kl = kl_penalty(lp, ref, torch.tensor([[1.0, 1.0, 0.0]]), 4)
    assert kl[0, :2].tolist() == pytest.approx([1 - math.log(2), 0.0])
    assert term.item() == pytest.approx((1 - math.log(2)) / 4)
    # its gradient pulls logp towards ref: d term / d logp_1 = (1 - e^d) / 4 = (1 - 2) / 4 = -0.25
    lp.requires_grad_(True)
    kl_penalty(lp, ref, torch.tensor([[1.0, 1.0, 0.0]]), 4)[0].backward()
    assert lp.grad[0].tolist() == pytest.approx([-0.25, 0.0, 0.0])


def test_aggregations_by_hand():
    # rows: [1, 2, 3] (3 tokens) and [4, pad, pad] (1 token), max_tokens 5
    per_tok = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    assert aggregate(per_tok, mask, "token", 2, 4, 5).item() == pytest.approx(10 / 4)        # DAPO
    assert aggregate(per_tok, mask, "sequence", 2, 4, 5).item() == pytest.approx((2 + 4) / 2)  # GRPO
    assert aggregate(per_tok, mask, "dr_grpo", 2, 4, 5).item() == pytest.approx(10 / (2 * 5))  # Dr.GRPO


def test_micro_batches_sum_to_the_full_batch():
    per_tok = torch.rand(4, 3)
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    for how in ("token", "sequence", "dr_grpo"):
        full = aggregate(per_tok, mask, how, 4, 9, 3)
        parts = aggregate(per_tok[:2], mask[:2], how, 4, 9, 3) + aggregate(per_tok[2:], mask[2:], how, 4, 9, 3)
        assert parts.item() == pytest.approx(full.item())


def test_float_noise_groups_carry_no_signal_and_singletons_never_train():
    # Three groups whose every reward is the format credit 0.1 (sizes 3, 6, 7): the float mean of
    # equal values is not exactly 0.1, so `std > 0` used to keep them. A singleton has no baseline.
    rewards = [0.1] * 3 + [0.1] * 6 + [0.1] * 7 + [1.0]
    groups = ["a"] * 3 + ["b"] * 6 + ["c"] * 7 + ["single"]
    adv, keep = group_advantages(rewards, groups)
    assert keep == [False] * 17 and adv == [0.0] * 17
    adv, keep = group_advantages(rewards, groups, drop_zero_variance=False)
    assert keep == [True] * 16 + [False]  # flat groups kept (advantage 0) when asked; the singleton never
    assert adv == [0.0] * 17


def test_token_and_flop_accounting_by_hand():
    from selfplay.compute import count_tokens, flops
    from selfplay.trainer import Row

    turns = [{"role": "student", "prompt_tokens": 5, "completion_tokens": 3},
             {"role": "student", "prompt_tokens": 5, "completion_tokens": 2},
             {"role": "tutor", "prompt_tokens": 4, "completion_tokens": 1}]
    rows = {"student": [Row([1] * 5, [2] * 3, 1.0)], "tutor": []}  # the tutor is frozen: nothing trained
    c = count_tokens(turns, rows, epochs=2, ref={"student": True, "tutor": True})
    # generation 8 + 7 = 15; one row of 8 tokens trained twice = 16; the KL reference reads it once = 8
    assert c == {"samples/student": 2, "tokens/student_gen": 15, "tokens/student_train": 16, "tokens/student_ref": 8,
                 "samples/tutor": 1, "tokens/tutor_gen": 5, "tokens/tutor_train": 0, "tokens/tutor_ref": 0}
    f = flops(10, c)
    # student 2·10·(15 + 8) + 6·10·16 = 460 + 960 = 1420; tutor 2·10·5 = 100
    assert f == {"flops/student": 1420, "flops/tutor": 100, "flops/total": 1520}


def test_forced_hint_tokens_get_nll_not_policy_gradient():
    from selfplay.grpo import nll, split_masks

    # two rows, C = 4. Row 0: 2 forced hint tokens + 2 sampled, its continuation solved (NLL on);
    # row 1: 1 forced + 2 sampled (padding in the last column), failed (NLL off).
    cmask = torch.tensor([[1., 1., 1., 1.], [1., 1., 1., 0.]])
    pg, nm = split_masks(cmask, torch.tensor([2, 1]), torch.tensor([True, False]))
    assert pg.tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]
    assert nm.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0]]
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.9, 0.9], [0.1, 0.9, 0.9, 0.9]]))
    # NLL = (-ln 0.5 - ln 0.25) / 2 forced tokens = (0.6931 + 1.3863) / 2 = 1.0397
    assert nll(lp, nm, 2).item() == pytest.approx((math.log(2) + math.log(4)) / 2, abs=1e-6)


def test_class_balanced_judge_advantages_by_hand():
    # 4 judge turns: 3 on wrong attempts ("incorrect"), 1 on a right one ("correct"), plus one
    # student row (None: untouched). n = 4, K = 2 classes: incorrect x 4 / (2·3) = 2/3,
    # correct x 4 / (2·1) = 2. Each class then carries the same total weight: 3 · 2/3 = 1 · 2.
    adv = class_balanced([0.3, -0.6, 0.9, 1.0, 5.0], ["incorrect", "incorrect", "incorrect", "correct", None])
    assert adv == pytest.approx([0.2, -0.4, 0.6, 2.0, 5.0])
    # one class only: weights n / (1 · n) = 1
    assert class_balanced([0.5, -0.5], ["incorrect", "incorrect"]) == pytest.approx([0.5, -0.5])


def test_length_buckets_by_hand():
    from selfplay.trainer import Row, micro_batches

    rows = [Row([1], [2] * n, 0.0) for n in (16, 6, 6, 6, 6, 16, 6, 6, 6, 6)]
    # sorted: eight of 6 tokens, two of 16. One micro-batch pads to 10 x 16 = 160 completion tokens;
    # cut after the eighth: 8 x 6 + 2 x 16 = 80 <= 0.75 x 160, so two micro-batches
    got = micro_batches(rows, 256, True)
    assert [[len(r.completion_ids) for r in b] for b in got] == [[6] * 8, [16] * 2]
    # nine of 6 and one of 7: the best cut saves 10 x 7 - (9 x 6 + 7) = 9 < 70 / 4, so no cut
    rows = [Row([1], [2] * n, 0.0) for n in [6] * 9 + [7]]
    assert [len(b) for b in micro_batches(rows, 256, True)] == [10]
    assert [len(b) for b in micro_batches(rows, 4, False)] == [4, 4, 2]  # off: the rows' order, by size
