import math

import pytest
import torch

from selfplay.grpo import aggregate, group_advantages, per_token_loss


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
    # ref - logp = d = log 2 -> k3 = e^d - d - 1 = 2 - log 2 - 1 = 0.30685
    lp, ref = torch.zeros(1, 1), torch.full((1, 1), math.log(2))
    loss, st = per_token_loss(lp, lp, torch.tensor([0.0]), 0.2, 0.2, ref, kl_coef=0.1)
    assert st["kl"].item() == pytest.approx(1 - math.log(2))
    assert loss.item() == pytest.approx(0.1 * (1 - math.log(2)))


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
