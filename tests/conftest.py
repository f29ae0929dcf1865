"""Shared fixtures. Tests run torch with 1 thread; the tiny base is pretrained once per machine for
a short budget (cached under .cache/ in the repo, keyed by its config) so model tests are real."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
TEST_CACHE = Path(os.environ.get("SELFPLAY_TEST_CACHE", ROOT / ".cache" / "test-models"))


def tiny_config(**sets):
    from selfplay.config import build_config

    base = {"model": {"threads": 1, "cache_dir": str(TEST_CACHE)},
            "bootstrap": {"seconds": 75, "batch_size": 64},
            "eval": {"n_tasks": 24, "samples": 2, "judge_attempts": 8},
            "curriculum": {"episodes_per_iter": 8},
            "logging": {"progress": False, "tensorboard": True, "checkpoint_every": 2}}
    return build_config(base, [f"{k}={v}" for k, v in sets.items()])


@pytest.fixture(scope="session")
def base_path():
    from selfplay.policy import ensure_base

    return ensure_base(tiny_config(), log=lambda *a: None)


@pytest.fixture
def policy(base_path):
    from selfplay.policy import Policy

    return Policy(tiny_config(), base_path)
