"""A tiny real ablation grid: equal student budgets, a table with standard errors, reused cells."""

import json
import re
from pathlib import Path

import pytest
import yaml

from selfplay.ablate import grid_configs, run_grid
from selfplay.grid_report import provenance
from selfplay.config import ConfigError
from tests.conftest import BASE


def test_grid_runs_reuses_cells_and_reports_standard_errors(base_path, tmp_path):
    spec = {**BASE, "iterations": 50, "max_student_samples": 64,
            "eval": {"n_tasks": 6, "samples": 1, "every": 1, "judge_attempts": 0},
            "curriculum": {"episodes_per_iter": 4},
            "variants": {"plain": {"graph.hint": False, "graph.mutate": False, "graph.judge": False},
                         "tutor": {}},
            "seeds": [0, 1]}
    spec["logging"] = {**BASE["logging"], "tensorboard": False, "plot": False}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    mine = tmp_path / "mine.jsonl"  # a task file of the user's: each cell is scored on it too
    mine.write_text('{"numbers": [3, 4], "target": 7}\n{"numbers": [2, 5], "target": 10}\n{"numbers": [9, 3], "target": 3}\n')
    for bad in ("mine", "9x=" + str(mine), "mine=" + str(tmp_path / "nope.jsonl")):  # refused before any cell runs
        with pytest.raises((ConfigError, FileNotFoundError)):
            run_grid(path, tmp_path / "out", [], tasks=[bad])
    assert not (tmp_path / "out" / "plain").exists()
    table = run_grid(path, tmp_path / "out", [], tasks=[f"mine={mine}"])
    rows = [line for line in table.splitlines() if line.startswith(("| plain |", "| tutor |"))]
    assert len(rows) == 2 and all("±" in r for r in rows)
    for v, row in zip(("plain", "tutor"), rows):  # each variant's own "before" (variants may differ in base)
        before = [json.loads((tmp_path / "out" / v / f"seed{s}" / "summary.json").read_text())["before"]["solve_rate"]
                  for s in (0, 1)]
        assert float(row.split("|")[2].split("±")[0]) == pytest.approx(sum(before) / 2, abs=5e-4)
    col = table.splitlines()[0].split("|").index(" identical hint groups ")
    assert rows[0].split("|")[col].strip() == "–" and "±" in rows[1].split("|")[col]  # plain GRPO gives no hints
    col = table.splitlines()[0].split("|").index(" whole-solution hints from it ")
    assert [r.split("|")[col].strip() for r in rows] == ["–", "never, never"]  # a few iterations cannot collapse
    assert re.search(r"^\| tutor − plain \| [+-]\d+\.\d\d ± \d+\.\d\d \| .* \|$", table, re.M)  # paired on the tasks
    mine_evals = {(v, s): json.loads((tmp_path / "out" / v / f"seed{s}" / "eval-mine.json").read_text())
                  for v in ("plain", "tutor") for s in (0, 1)}
    assert all(e["n_tasks"] == 3 and len(e["per_task"]) == 3 for e in mine_evals.values())
    col = table.splitlines()[0].split("|").index(" mine solve (after) ")
    assert float(rows[0].split("|")[col].split("±")[0]) == pytest.approx(
        (mine_evals["plain", 0]["solve_rate"] + mine_evals["plain", 1]["solve_rate"]) / 2, abs=5e-4)
    assert "Paired on the same mine tasks, each variant minus plain:" in table
    for v in ("plain", "tutor"):
        for s in (0, 1):
            n = json.loads((tmp_path / "out" / v / f"seed{s}" / "summary.json").read_text())["totals"]["samples/student"]
            # every cell stops once it has drawn 64 student samples; a tutor iteration can overshoot by
            # at most its own hinted attempts (4 episodes x (G + H x hint_attempts) = 4 x 16)
            assert 64 <= n <= 64 + 4 * 16 - 1 and (v == "tutor" or n == 64)
    code = json.loads((tmp_path / "out" / "plain" / "seed0" / "summary.json").read_text())["code"]
    assert table.rstrip().splitlines()[-1].startswith(f"Code: {code.get('commit', code['version'])[:10]}")
    assert (tmp_path / "out" / "solve_rate.png").is_file()
    mtime = [(tmp_path / "out" / "plain" / "seed0" / f).stat().st_mtime for f in ("summary.json", "eval-mine.json")]
    run_grid(path, tmp_path / "out", [], tasks=[f"mine={mine}"])  # finished cells and their evaluations are reused
    assert [(tmp_path / "out" / "plain" / "seed0" / f).stat().st_mtime for f in ("summary.json", "eval-mine.json")] == mtime
    mine.write_text('{"numbers": [3, 4], "target": 12}\n')  # another file under the same name: evaluated again
    run_grid(path, tmp_path / "out", [], tasks=[f"mine={mine}"])
    assert json.loads((tmp_path / "out" / "plain" / "seed0" / "eval-mine.json").read_text())["n_tasks"] == 1


def test_parallel_cells_stop_at_an_equal_flop_budget(base_path, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    import selfplay.ablate

    budget = 2.0e10  # a few iterations of the test model
    spec = {**BASE, "iterations": 1000, "max_total_flops": budget,
            "eval": {"n_tasks": 4, "samples": 1, "judge_attempts": 0},
            "curriculum": {"episodes_per_iter": 4},
            "variants": {"plain": {"graph.hint": False, "graph.mutate": False, "graph.judge": False,
                                   "trainer.train_tutor": False},
                         "tutor": {"graph.mutate": False, "graph.judge": False},
                         "lagged": {"graph.hint": False, "graph.mutate": False, "graph.judge": False,
                                    "trainer.train_tutor": False, "trainer.policy_lag": 1}},
            "seeds": [0]}
    spec["logging"] = {**BASE["logging"], "tensorboard": False, "plot": False}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(selfplay.ablate, "REPORT_EVERY_S", 0.2)
    said = io.StringIO()
    run_grid(path, tmp_path / "out", [], console=Console(file=said, width=200), jobs=2)  # each cell its own process
    said = said.getvalue()
    for v in ("plain", "tutor", "lagged"):  # where each cell stands while it runs, and how it ended
        s = json.loads((tmp_path / "out" / v / "seed0" / "summary.json").read_text())
        assert (f"done {v}/seed0 in " in said and f"held-out solve rate {s['before']['solve_rate']:.3f} -> "
                f"{s['after']['solve_rate']:.3f}" in said), said
    assert re.search(r"  (plain|tutor|lagged)/seed0: \d+% of its budget, \d+s, eta ", said), said
    # jobs counts processes: the lagged cell (two processes) ran alone. A cell's config.yaml is
    # written as it starts and its summary.json as it ends: no other cell's interval overlaps it.
    span = {v: ((tmp_path / "out" / v / "seed0" / "config.yaml").stat().st_mtime,
                (tmp_path / "out" / v / "seed0" / "summary.json").stat().st_mtime) for v in ("plain", "tutor", "lagged")}
    lo, hi = span["lagged"]
    assert all(end <= lo or start >= hi for v, (start, end) in span.items() if v != "lagged"), span
    for v in ("plain", "tutor", "lagged"):
        d = tmp_path / "out" / v / "seed0"
        s = json.loads((d / "summary.json").read_text())
        per_it = [json.loads(x)["flops/total"] for x in (d / "metrics.jsonl").read_text().splitlines()
                  if "flops/total" in x]
        # the run stops at the first iteration that reaches the budget: the one before had not
        assert s["flops"]["flops/total"] >= budget > per_it[-2]
        assert (d / "run.log").is_file()


def test_only_runs_the_named_cells_and_the_table_waits_for_the_rest(base_path, tmp_path):
    spec = {**BASE, "iterations": 50, "max_student_samples": 16,
            "eval": {"n_tasks": 4, "samples": 1, "judge_attempts": 0}, "curriculum": {"episodes_per_iter": 2},
            "variants": {"plain": {"graph.hint": False, "graph.mutate": False, "graph.judge": False}, "tutor": {}},
            "seeds": [0, 1]}
    spec["logging"] = {**BASE["logging"], "tensorboard": False, "plot": False}
    path, out = tmp_path / "grid.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(spec))
    for bad in ("nope", "plain:2", "plain:x"):  # refused before any cell runs
        with pytest.raises(ConfigError, match=f"--only {bad}: no such cell"):
            run_grid(path, out, [], only=[bad])
    assert not out.exists()
    msg = run_grid(path, out, [], only=["plain:1"])
    assert msg == "1 of 4 cells finished; the table waits for plain:0, tutor:0, tutor:1\n"
    assert [p.relative_to(out).parent.as_posix() for p in out.glob("*/*/summary.json")] == ["plain/seed1"]
    assert not (out / "results.md").exists()


@pytest.mark.parametrize("how", ["sigint", "sigterm_under_nohup"])
def test_an_interrupted_parallel_grid_stops_its_cells_with_one_line(base_path, tmp_path, how):
    # Ctrl-C on `selfplay ablate --jobs 2` printed a traceback and left the cells running, holding their
    # dirs' locks (run again, the grid found them "in use"). Here the signal reaches the grid's process
    # alone, as `kill` sends it: the grid must stop its cells itself. `nohup grid &` from a script
    # starts the grid and so its cells with SIGINT ignored; `kill -TERM` then killed the grid alone and
    # the cells ran on, orphaned.
    import fcntl
    import signal
    import subprocess
    import sys
    import time

    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if how != "sigint" else None

    spec = {**BASE, "iterations": 100000, "max_total_flops": 1e15, "eval": {"n_tasks": 4, "samples": 1, "judge_attempts": 0},
            "curriculum": {"episodes_per_iter": 2},
            "variants": {"a": {"graph.hint": False}, "b": {"graph.hint": False, "trainer.lr": 1e-4}}, "seeds": [0]}
    spec["logging"] = {**BASE["logging"], "tensorboard": False, "plot": False}
    path, out = tmp_path / "grid.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(spec))
    p = subprocess.Popen([sys.executable, "-m", "selfplay.cli", "ablate", "--config", str(path), "--out", str(out),
                          "--jobs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=ignore_sigint)
    cells = [out / v / "seed0" for v in ("a", "b")]
    deadline = time.time() + 300
    while not all((d / "metrics.jsonl").is_file() and '"flops/total"' in (d / "metrics.jsonl").read_text() for d in cells):
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.5)  # both cells are past their first iteration
    p.send_signal(signal.SIGINT if how == "sigint" else signal.SIGTERM)
    _, err = p.communicate(timeout=50)  # the grid kills a cell that ignores its SIGINT only after 60 s
    assert p.returncode == 2 and "interrupted; finished cells are kept" in err and "Traceback" not in err, err
    for d in cells:  # no cell process is left holding its dir
        with open(d / ".lock") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert not (d / "summary.json").exists() and "interrupted" in (d / "run.log").read_text()


def test_a_failed_parallel_cell_is_reported_after_the_others_finish(base_path, tmp_path):
    from selfplay.rundir import lock_run_dir, unlock_run_dir

    spec = {**BASE, "iterations": 2, "eval": {"n_tasks": 4, "samples": 1, "judge_attempts": 0},
            "curriculum": {"episodes_per_iter": 2},
            "variants": {"a": {"graph.hint": False}, "b": {"graph.hint": False, "trainer.lr": 1e-4}}, "seeds": [0]}
    spec["logging"] = {**BASE["logging"], "tensorboard": False, "plot": False}
    path, out = tmp_path / "grid.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(spec))
    (out / "a" / "seed0").mkdir(parents=True)
    lock_run_dir(out / "a" / "seed0")  # cell a is "still running" elsewhere: its process fails at once
    try:
        with pytest.raises(RuntimeError, match=r"cell .*a/seed0 failed \(exit 2\)"):
            run_grid(path, out, [], jobs=2)
    finally:
        unlock_run_dir(out / "a" / "seed0")
    assert "in use by another selfplay process" in (out / "a" / "seed0" / "run.log").read_text()
    assert (out / "b" / "seed0" / "summary.json").is_file()  # the other cell ran to its end
    assert not (out / "a" / "seed0" / "memory.db").exists()


def test_a_cells_budget_share_comes_from_the_tail_of_its_metrics(tmp_path):
    from selfplay.ablate import cell_share
    from selfplay.config import build_config

    cfg = build_config(BASE, ["iterations=1000", "max_total_flops=2e10", "max_student_samples=800"])
    assert cell_share(tmp_path, cfg) == 0.0  # not started: no metrics.jsonl
    rows = [{"iteration": 0, "eval/solve_rate": 0.1},
            {"iteration": 9, "samples/student": 100, "flops/total": 4e9},
            {"iteration": 10, "samples/student": 200, "flops/total": 5e9},
            {"iteration": 10, "eval/solve_rate": 0.2}]  # an eval line carries no totals: the line before counts
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 11, "sam')
    # iteration 10: iterations 10/1000 = 1%, samples 200/800 = 25%, FLOPs 5e9/2e10 = 25%; the cut last line is skipped
    assert cell_share(tmp_path, cfg) == 0.25
    rows[2]["flops/total"] = 1.5e10  # FLOPs 75%: the largest share is the one that ends the run
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cell_share(tmp_path, cfg) == 0.75


def test_paired_differences_are_per_task_within_a_seed_then_over_seeds(tmp_path):
    from selfplay.grid_report import paired_table

    per_task = {("ref", 0): [0, 0.5, 0.25, 0], ("v", 0): [0.5, 0.5, 0.25, 0.25],
                ("ref", 1): [0.25, 0.25, 0, 0], ("v", 1): [0.25, 0, 0, 0]}
    for (v, s), rates in per_task.items():
        (tmp_path / v / f"seed{s}").mkdir(parents=True)
        (tmp_path / v / f"seed{s}" / "eval_after.json").write_text(json.dumps({"per_task": rates}))
    # seed 0: differences 50, 0, 0, 25 points: mean 18.75, sample SD sqrt(1718.75 / 3) = 23.94, SE 23.94 / 2 = 11.97
    # seed 1: 0, -25, 0, 0: mean -6.25, SD sqrt(468.75 / 3) = 12.5, SE 6.25
    # over seeds: mean (18.75 - 6.25) / 2 = 6.25, SD sqrt(2 x 12.5^2) = 17.68, SE 17.68 / sqrt(2) = 12.50
    row = [x for x in paired_table(tmp_path, ["ref", "v"], [0, 1]) if x.startswith("| v")]
    assert row == ["| v − ref | +18.75 ± 11.97 | -6.25 ± 6.25 | +6.25 ± 12.50 |"]
    assert paired_table(tmp_path, ["ref"], [0, 1]) == []  # one variant: nothing to pair


def test_provenance_flags_cells_that_ran_on_different_or_edited_code():
    a, b = {"code": {"version": "0.1.0", "commit": "a" * 40, "dirty": False}}, {"code": {"version": "0.1.0", "commit": "b" * 40}}
    assert provenance([a, a]) == "Code: aaaaaaaaaa."
    assert provenance([a, b]) == "Code: aaaaaaaaaa, bbbbbbbbbb (cells ran on different code: compare with care)."
    edited = {"code": {**a["code"], "dirty": True}}
    assert provenance([a, edited]) == ("Code: aaaaaaaaaa; 1 of 2 cells ran with local edits "
                                       "(cells ran on different code: compare with care).")
    assert provenance([{}]) == "Code: unrecorded."  # a cell from before summaries recorded their code


GRIDS = sorted((Path(__file__).parent.parent / "configs" / "ablations").glob("*.yaml"))


@pytest.mark.parametrize("grid", GRIDS, ids=lambda p: p.stem)
def test_every_shipped_grid_builds_a_valid_config_for_every_cell(grid):
    # the README's results cite these files: a renamed or removed config key must fail here, not
    # after a grid's first hours. Every cell runs its own seed, and every grid fixes a budget
    variants, seeds, _, cfgs = grid_configs(grid, [])
    assert len(cfgs) == len(variants) * len(seeds) >= 2
    assert all(c.max_total_flops or c.max_student_samples for c in cfgs.values())
    assert {c.seed for c in cfgs.values()} == set(seeds)


def test_grid_with_an_unknown_key_is_refused_before_any_cell_runs(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"variants": {"a": {"trainer.no_such_key": 1}}, "seeds": [0]}))
    with pytest.raises(ConfigError, match="no_such_key"):
        run_grid(path, tmp_path / "out", [])
    assert not (tmp_path / "out").exists()
