"""The multi-process trainer (torchrun, gloo on CPU): 2 processes on the two halves of a batch give
the gradients and adapters of 1 process on the whole batch, and a 2-process run stores every
episode once."""

import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import torch

from tests.conftest import ROOT, cli_sets, tiny_config

# One update on fixed rows, sharded rows[rank::world]; writes the student adapter and its gradient.
WORKER = textwrap.dedent('''
    import json, os, random, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from selfplay import distributed as dist
    from selfplay.config import build_config
    from selfplay.policy import Policy
    from selfplay.trainer import Row, Trainer

    torch.set_num_threads(1)
    dist.init("cpu")
    cfg = build_config(json.loads(sys.argv[2]))
    pol = Policy(cfg, sys.argv[3])
    rng = random.Random(0)
    rows = []
    for i in range(13):  # odd: the shards differ in size; lengths vary; some rows have a forced prefix
        prompt = [rng.randrange(3, 40) for _ in range(rng.randrange(4, 9))]
        completion = [rng.randrange(3, 40) for _ in range(rng.randrange(2, 10))] + [pol.eos_id]
        forced = rng.choice([0, 0, 2])
        rows.append(Row(prompt, completion, rng.uniform(-1.5, 1.5), None, forced, forced > 0 and i % 2 == 0))
    if sys.argv[5] == "aligned" and dist.world() == 1:  # one process, micro-batches = the two shards
        rows = rows[0::2] + rows[1::2]
    tr = Trainer(pol, cfg)
    tr.step("student", rows[dist.rank()::dist.world()], cfg.generation.max_new_tokens)
    out = {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in pol.model.named_parameters()
           if ".student." in n and "lora_" in n}
    torch.save(out, os.path.join(sys.argv[4], f"{sys.argv[5]}-rank{dist.rank()}of{dist.world()}.pt"))
    dist.shutdown()
''')


def _one_vs_two(tmp_path, base_path, cfg, mode):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    args = [str(ROOT), json.dumps(cfg.model_dump(mode="json")), str(base_path), str(tmp_path), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(worker), *args], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(worker), *args], check=True, env=env, timeout=300, capture_output=True)
    one = torch.load(tmp_path / f"{mode}-rank0of1.pt")
    twos = [torch.load(tmp_path / f"{mode}-rank{r}of2.pt") for r in (0, 1)]
    assert all(one.keys() == two.keys() for two in twos) and len(one) > 0
    # the update really moved the adapter (B starts at zero)
    assert max(one[n][0].abs().max() for n in one if "lora_B" in n) > 0
    return one, twos


def test_two_processes_give_one_process_gradients_and_adapters(base_path, tmp_path):
    # 2 epochs (the second sees ratios != 1 and clipping), the NLL term, token aggregation. The one
    # process runs the same rows as micro-batches of 7 and 6 rows, i.e. the two ranks' shards, so
    # both sum the same two float32 partial gradients: gradients and adapters must agree (to 1e-5;
    # they come out equal to the bit).
    # no clipping: a clipped gradient (and Adam) would hide a wrong scale, e.g. DDP's average
    cfg = tiny_config(**{"trainer.epochs": 2, "trainer.hint_nll": 0.5, "trainer.micro_batch": 7, "trainer.max_grad_norm": 1e9,
                         "trainer.length_buckets": False})  # the micro-batches are the shards
    one, twos = _one_vs_two(tmp_path, base_path, cfg, "aligned")
    for two in twos:
        for n in one:
            (p1, g1), (p2, g2) = one[n], two[n]
            assert torch.allclose(g1, g2, atol=1e-5, rtol=0), (n, (g1 - g2).abs().max())
            assert torch.allclose(p1, p2, atol=1e-5, rtol=0), (n, (p1 - p2).abs().max())


def test_two_processes_with_other_micro_batches_agree_to_float_rounding(base_path, tmp_path):
    # micro-batches of 4: the sums run in another order, so gradients agree to float32 rounding
    # (seen: 1.5e-7). The adapters are not compared here: Adam divides each element by its own
    # gradient's RMS, so an element whose first gradient is ~1e-8 (Adam's eps) moves by up to lr
    # either way, and rounding alone decides (seen: 1.3e-5 at lr 1e-3), with one process or two.
    cfg = tiny_config(**{"trainer.epochs": 2, "trainer.hint_nll": 0.5, "trainer.micro_batch": 4, "trainer.max_grad_norm": 1e9})
    one, twos = _one_vs_two(tmp_path, base_path, cfg, "misaligned")
    for two in twos:
        for n in one:
            assert torch.allclose(one[n][1], two[n][1], atol=1e-5, rtol=0), n


def test_torchrun_selfplay_run_stores_every_episode_once(base_path, tmp_path):
    out = tmp_path / "run"
    sets = cli_sets(**{"iterations": 3, "eval.n_tasks": 8, "eval.samples": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "selfplay", "run", "--out", str(out), "--quiet", *sets],
                       capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"iterations": 3') == 1  # rank 0 reports, once
    per_iter = tiny_config().curriculum.episodes_per_iter
    db = sqlite3.connect(out / "memory.db")
    (n, distinct), = db.execute("select count(*), count(distinct id) from episodes").fetchall()
    assert n == distinct == 3 * per_iter
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["totals"]["samples/student"] > 0
    # the checkpoint holds both ranks' sampler streams: one process cannot continue it
    r = subprocess.run([sys.executable, "-m", "selfplay", "run", "--resume", str(out), "--quiet"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "resume with as many" in r.stderr and "Traceback" not in r.stderr
