"""A user's install: build the wheel, install it into a fresh venv, run `selfplay` from an empty
folder (prompts and configs must come from inside the wheel, not from this checkout)."""

import os
import shutil
import subprocess
import sys
import sysconfig

from tests.conftest import ROOT, cli_sets


def test_wheel_installs_and_runs_outside_the_source_tree(base_path, tmp_path):
    src = tmp_path / "src"  # build from a copy, so the checkout gets no build/ or egg-info
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "selfplay", "roles", "memory", "prompts", "configs"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, src],
                   check=True, capture_output=True)
    [wheel] = dist.glob("selfplay-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    # the dependencies (torch, transformers, ...) come from this interpreter's site-packages, read as a
    # plain path: its .pth files (the editable install of this checkout) are not processed
    (venv / site.split(str(venv) + "/", 1)[1] / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True, capture_output=True)

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    where = subprocess.run([py, "-c", "import selfplay.config as c; print(c.__file__, c.DEFAULT_CONFIG)"], cwd=empty,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert str(venv) in where and str(ROOT) not in where, where
    sets = cli_sets(**{"iterations": 2, "eval.n_tasks": 4, "eval.samples": 1, "eval.judge_attempts": 0,
                       "curriculum.episodes_per_iter": 2})
    r = subprocess.run([venv / "bin" / "selfplay", "run", "--config", "configs/countdown-tiny.yaml", "--out", "r",
                        "--quiet", *sets], cwd=empty, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (empty / "r" / "summary.json").is_file() and (empty / "r" / "memory.db").is_file()
