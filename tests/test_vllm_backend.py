"""The vLLM backend. vLLM needs a GPU and is not installable here, so the first test runs the
backend against a FAKE engine module (named so) to check its own logic: per-row LoRA requests,
a new adapter name and id after every update, per-row token caps. The real-engine test skips
unless vLLM is installed."""

import sys
import types

import pytest

from tests.conftest import tiny_config


class _FakeLLM:
    def __init__(self, model, **kw):
        self.kw, self.calls = kw, []

    def generate(self, prompts, params, lora_request=None, use_tqdm=False):
        self.calls.append((prompts, params, lora_request))
        out = []
        for p, sp in zip(prompts, params):
            ids = [7] * min(sp.max_tokens, 3)
            comp = types.SimpleNamespace(token_ids=ids, logprobs=[{7: types.SimpleNamespace(logprob=-0.5)}] * len(ids))
            out.append(types.SimpleNamespace(outputs=[comp]))
        return out


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM = _FakeLLM
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    lora = types.ModuleType("vllm.lora")
    req = types.ModuleType("vllm.lora.request")
    req.LoRARequest = lambda name, int_id, path: types.SimpleNamespace(name=name, id=int_id, path=path)
    for name, mod in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", req)):
        monkeypatch.setitem(sys.modules, name, mod)


def test_vllm_backend_with_fake_engine_versions_adapters_and_routes_rows(fake_vllm, policy, tmp_path):
    from selfplay.vllm_backend import VLLMBackend

    b = VLLMBackend(policy, tiny_config(), workdir=tmp_path)
    first = {k: (v.name, v.id) for k, v in b.requests.items()}
    assert (tmp_path / "v0" / "student" / "adapter_model.safetensors").is_file()
    out = b.complete([[5, 6], [5, 6], [7]], ["student", "tutor", "__base__"], [2, 5, 1])
    prompts, params, reqs = b.llm.calls[-1]
    assert [r.name if r else None for r in reqs] == ["student-v0", "tutor-v0", None]
    assert [p.max_tokens for p in params] == [2, 5, 1]
    assert [len(o.ids) for o in out] == [2, 3, 1] and out[0].logprobs == [-0.5, -0.5]
    b.sync_adapters(1)
    second = {k: (v.name, v.id) for k, v in b.requests.items()}
    for k in first:  # a new name AND a new int id: vLLM would serve a cached stale adapter otherwise
        assert second[k][0] != first[k][0] and second[k][1] != first[k][1]
    assert (tmp_path / "v1" / "tutor" / "adapter_model.safetensors").is_file()


def test_vllm_backend_real_engine(policy):
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    from selfplay.vllm_backend import VLLMBackend

    b = VLLMBackend(policy, tiny_config())
    out = b.complete([policy.encode("S:3 7 25>21|")] * 2, ["student", "tutor"], [8, 8], temperature=0)
    assert len(out) == 2 and all(o.ids for o in out)
