"""Shared fixtures. Tests run torch with 1 thread; the tiny base is pretrained once per machine
(900 steps, about 4 minutes on 1 thread, cached under ~/.cache/selfplay/test-models, keyed by its config), so every
model test runs the real bootstrapped model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
# the test base is cached per machine (keyed by its config), so only a new machine pays the bootstrap
TEST_CACHE = Path(os.environ.get("SELFPLAY_TEST_CACHE", Path.home() / ".cache" / "selfplay" / "test-models"))


BASE = {"model": {"threads": 1, "cache_dir": str(TEST_CACHE)},
        "bootstrap": {"steps": 900, "batch_size": 64},  # ~4 min on 1 thread; steps, so every machine gets the same base
        "eval": {"n_tasks": 24, "samples": 2, "judge_attempts": 8},
        "curriculum": {"episodes_per_iter": 8},
        "logging": {"progress": False, "tensorboard": True, "checkpoint_every": 2}}


def tiny_config(**sets):
    from selfplay.config import build_config

    return build_config(BASE, [f"{k}={v}" for k, v in sets.items()])


def cli_sets(**sets) -> list[str]:
    """`--set k=v` arguments giving the CLI the same config as `tiny_config(**sets)`."""
    flat = {f"{sec}.{k}": v for sec, d in BASE.items() for k, v in d.items()} | sets
    return [a for k, v in flat.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="session")
def base_path():
    from selfplay.policy import ensure_base

    return ensure_base(tiny_config(), log=lambda *a: None)


@pytest.fixture
def policy(base_path):
    from selfplay.policy import Policy

    return Policy(tiny_config(), base_path)
