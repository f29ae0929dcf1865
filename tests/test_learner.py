"""The learner process (trainer.policy_lag=1): its update equals the in-process one bit for bit, a
lagged run samples one update behind except after a checkpoint, and resuming it replays exactly."""

import random
import sqlite3
import subprocess
import sys

import torch
import yaml

from selfplay.learner import Learner, adapter_vectors
from selfplay.loop import run
from selfplay.policy import Policy
from selfplay.trainer import Row, Trainer
from tests.conftest import cli_sets, tiny_config
from tests.test_loop import EASY


def _rows(pol, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(9):
        prompt = [rng.randrange(3, 40) for _ in range(rng.randrange(4, 9))]
        completion = [rng.randrange(3, 40) for _ in range(rng.randrange(2, 10))] + [pol.eos_id]
        rows.append(Row(prompt, completion, rng.uniform(-1.5, 1.5), None))
    return rows


def test_learner_update_equals_the_in_process_update(base_path):
    cfg = tiny_config()
    here, there = Policy(cfg, base_path), Policy(cfg, base_path)
    trainer = Trainer(here, cfg)
    learner = Learner(cfg, there, threads=1)
    caps = {"student": cfg.generation.max_new_tokens, "tutor": cfg.generation.tutor_max_new_tokens}
    try:
        for step in range(2):  # the second step uses AdamW's moments from the first
            rows = {"student": _rows(here, step), "tutor": _rows(here, 10 + step) if step else []}
            for role in ("student", "tutor"):
                trainer.step(role, rows[role], caps[role])
            learner.submit(rows, caps)
            out = learner.collect()
            assert out["versions"] == trainer.versions == {"student": step + 1, "tutor": step}
            mine = adapter_vectors(here)
            assert abs(mine["student"]).max() > 0  # the update moved LoRA B off zero
            for role in ("student", "tutor"):  # the tutor: untouched at step 0, trained at step 1
                assert (out["weights"][role] == mine[role]).all(), role
        assert learner.collect() is None  # nothing pending
        st = learner.state()
        for a, b in zip(st["opt"]["student"]["state"].values(), trainer.state()["opt"]["student"]["state"].values()):
            assert torch.equal(a["exp_avg"], b["exp_avg"])
    finally:
        learner.close()
    assert not learner.proc.is_alive()


def _versions(db, role="student"):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute("select iteration, max(adapter_version) from turns where role = ? group by iteration",
                       (role,)).fetchall()
    con.close()
    return dict(rows)


def _turns(db, first):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute("select iteration, episode_id, prompt, completion, reward, advantage, adapter_version from turns "
                       "where iteration >= ? order by id", (first,)).fetchall()
    con.close()
    return rows


def _resumed(sets: dict, out, stop: int, end: int):
    """The turns from iteration stop+1 of a run stopped after `stop` iterations and resumed to `end`."""
    run(tiny_config(**sets, iterations=stop), out, quiet=True)
    conf = yaml.safe_load((out / "config.yaml").read_text())
    conf["iterations"] = end
    (out / "config.yaml").write_text(yaml.safe_dump(conf))
    run(None, out, resume=True, quiet=True)
    return _turns(out / "memory.db", stop + 1)


SETS = {**EASY, "graph.hint": False, "graph.mutate": False, "graph.judge": False, "trainer.train_tutor": False,
        "trainer.policy_lag": 1, "eval.n_tasks": 4, "eval.samples": 1, "eval.judge_attempts": 0,
        "logging.checkpoint_every": 2}


def test_lagged_run_samples_one_update_behind_and_resumes_exactly(base_path, tmp_path):
    cfg = tiny_config(**SETS, iterations=5)
    run(cfg, tmp_path / "whole", quiet=True)
    v = _versions(tmp_path / "whole" / "memory.db")
    # the easy set gives every update rows; iteration k samples with the weights before update k-1,
    # except right after a checkpoint (2, 4), which waits for the pending update
    assert v == {1: 0, 2: 0, 3: 2, 4: 2, 5: 4}, v
    # the same run stopped at iteration 2 and resumed to 5 replays iterations 3-5 exactly
    assert _resumed(SETS, tmp_path / "part", 2, 5) == _turns(tmp_path / "whole" / "memory.db", 3)


def test_lagged_run_trains_the_tutor_in_the_main_process_and_resumes_exactly(base_path, tmp_path):
    # policy_lag 1 with a trained tutor: the learner updates the student, the main process the
    # tutor (judge turns here, one update behind like the student's), and a checkpoint holds both
    # processes' optimizers: a run stopped at 2 and resumed to 4 replays iterations 3-4 exactly.
    sets = {**SETS, "graph.judge": True, "trainer.train_tutor": True}
    run(tiny_config(**sets, iterations=4), tmp_path / "whole", quiet=True)
    tutor = _versions(tmp_path / "whole" / "memory.db", "tutor")
    assert tutor[1] == 0 and tutor[4] >= 2, tutor  # the tutor was trained, and its weights reached the graph
    assert _resumed(sets, tmp_path / "part", 2, 4) == _turns(tmp_path / "whole" / "memory.db", 3)


def test_a_lagged_cli_run_prints_no_library_noise_from_its_learner(base_path, tmp_path):
    # the learner is a spawned process: it starts with Python's default warning filters and
    # transformers' progress bars on, so before it quieted them itself every lagged run printed a
    # "Loading weights" bar and peft's FutureWarning after the main process had silenced both
    sets = cli_sets(**{"iterations": 2, "trainer.policy_lag": 1, "eval.n_tasks": 4, "eval.samples": 1,
                       "eval.judge_attempts": 0, "curriculum.episodes_per_iter": 4, "logging.log_every": 1})
    r = subprocess.run([sys.executable, "-m", "selfplay.cli", "run", "--out", str(tmp_path / "run"), *sets],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x.split(" | ")[0] for x in r.stderr.splitlines() if x.startswith("iter ")] == ["iter 1/2", "iter 2/2"]
    assert "Loading weights" not in r.stderr and "Warning" not in r.stderr, r.stderr[-3000:]
