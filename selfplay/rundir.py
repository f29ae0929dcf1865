"""The run directory: validated before a run starts or resumes, and held by one process at a time.

A run dir holds config.yaml (the run's own config, which `--resume` uses), memory.db, metrics.jsonl,
checkpoint/, eval_*.json and summary.json. Two processes on one dir would interleave iterations in
one episode store, so each holds an exclusive lock on DIR/.lock while it runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from selfplay.config import RunConfig, build_config


class RunError(RuntimeError):
    """A user-facing problem with the run directory (one-line message)."""


def prepare_dir(out: Path, cfg: RunConfig | None, resume: bool) -> RunConfig:
    """Validate the run dir; on resume the run's own config is used."""
    if resume:
        if not (out / "config.yaml").is_file():
            raise RunError(f"--resume: {out} is not a selfplay run dir (no config.yaml)")
        return build_config(yaml.safe_load((out / "config.yaml").read_text()))
    if (out / "memory.db").exists() or (out / "config.yaml").exists():
        raise RunError(f"{out} already holds a run; use --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return cfg


_held: dict[Path, object] = {}  # run dir -> its open lock file, held until the process exits


def lock_run_dir(out: Path) -> None:
    """One process per run dir: two (a `--resume` while the run goes on, an ablation restarted
    beside its still-running cells) would interleave iterations in one episode store and truncate
    each other's writes. An exclusive flock on DIR/.lock, released by the OS when the process
    ends, however it ends (kill -9 included). No-op where fcntl is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        return
    out = out.resolve()
    if out in _held:
        return
    fh = open(out / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        pid = fh.read().strip() or "?"
        fh.close()
        raise RunError(f"{out} is in use by another selfplay process (pid {pid}); wait for it to end or stop it")
    fh.truncate(0)
    fh.write(str(os.getpid()))
    fh.flush()
    _held[out] = fh


def unlock_run_dir(out: Path) -> None:
    """Release `lock_run_dir`'s lock (a finished run; a notebook that ran it may live on)."""
    fh = _held.pop(out.resolve(), None)
    if fh is not None:
        fh.close()
