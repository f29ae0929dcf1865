"""The learner: the trainer in a second process, so one iteration's update overlaps the next
iteration's rollout (`trainer.policy_lag: 1`).

Why a process and not a thread: on a small model both halves are bound by Python and per-op
dispatch, so two threads under one GIL overlapped nothing (0.139 vs 0.145 s per iteration
measured); two processes with one torch thread each run side by side.

Protocol, one pipe, the main process always waits for each reply before the next request:
    submit(rows)  -> the learner steps each role it got rows for (the student, and the tutor
                     unless the main process keeps the tutor's update) ...
    collect()     -> ... and answers with the metrics, the new adapter weights (one flat fp32
                     vector per adapter) and the adapter versions, which the main process writes
                     into its own policy, from which its sampler is rebuilt.
    state() / load(...)  the optimizers and versions, for checkpoints.
The learner holds its own copy of the base and both adapters; it starts from the main process's
weights (`load`), so the two copies agree exactly after every collect.

Off-policy correction: the rows of iteration k were sampled by the weights before update k-1 (one
update behind), so the ratio exp(logp - behaviour_logp) is no longer 1 at the first epoch and the
PPO clip bounds the step, as in asynchronous RL systems (e.g. PipelineRL, AReaL). Errors in the
learner come back as a one-line RuntimeError in the main process; a learner that dies (killed,
out of memory) is reported the same way.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import traceback

import torch

from selfplay.config import RunConfig

ROLES = ("student", "tutor")


def adapter_vectors(policy, roles=ROLES) -> dict[str, "numpy.ndarray"]:  # noqa: F821
    """Each role's LoRA weights as one flat array (numpy: pickles as raw bytes)."""
    return {r: policy.adapter_vector(r).cpu().numpy() for r in roles}


def load_adapter_vectors(policy, vectors: dict) -> None:
    """Write `adapter_vectors` output into `policy`'s adapters (in place)."""
    for role, vec in vectors.items():
        policy.set_adapter_vector(role, torch.from_numpy(vec))


class Learner:
    def __init__(self, cfg: RunConfig, policy, threads: int):
        ctx = mp.get_context("spawn")  # fork after torch started its thread pools can deadlock
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(cfg, str(policy.path), threads, child), daemon=True,
                                name="selfplay-learner")
        self.proc.start()
        child.close()
        self.pending = False
        self._ask("load", {"weights": adapter_vectors(policy)})

    def _ask(self, *msg):
        self._send(msg)
        return self._answer()

    def _send(self, msg) -> None:
        try:
            self.conn.send(msg)
        except OSError:  # BrokenPipeError included
            self._died()

    def _died(self):
        self.proc.join(timeout=5)
        raise RuntimeError(f"the learner process died (exit code {self.proc.exitcode}); a script that starts a "
                           "run needs the `if __name__ == '__main__':` guard (multiprocessing spawn)") from None

    def _answer(self):
        try:
            ok, out = self.conn.recv()
        except (EOFError, OSError):
            self._died()
        if not ok:
            raise RuntimeError(f"the learner failed: {out}")
        return out

    def submit(self, rows: dict[str, list], caps: dict[str, int]) -> None:
        """Start one update of each role on its rows; `collect` returns its result."""
        assert not self.pending, "collect() the previous update first"
        self._send(("step", {"rows": rows, "caps": caps}))
        self.pending = True

    def collect(self) -> dict | None:
        """The pending update's {"metrics", "weights", "versions"}, or None if nothing is pending."""
        if not self.pending:
            return None
        self.pending = False
        return self._answer()

    def state(self) -> dict:
        assert not self.pending
        return _loads(self._ask("state", {}))

    def load(self, trainer_state: dict | None, weights: dict) -> None:
        assert not self.pending
        self._ask("load", {"trainer": trainer_state and _dumps(trainer_state), "weights": weights})

    def close(self) -> None:
        if self.proc.is_alive():
            try:  # a pending update's reply first: one larger than the pipe's buffer blocks the learner's send,
                if self.pending and self.conn.poll(30):  # and it would never read the stop (a run that raised)
                    self.conn.recv()
                self.conn.send(("stop", {}))
            except (EOFError, OSError):  # BrokenPipeError included
                pass
            self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()  # reaped: no zombie in a notebook that lives on
        self.pending = False
        self.conn.close()


def _dumps(obj) -> bytes:
    """Optimizer states travel as torch.save bytes, not as tensors in shared memory."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def serve(cfg: RunConfig, base_path: str, threads: int, conn) -> None:
    """The learner process's loop (the `spawn` target)."""
    from pathlib import Path

    from selfplay.policy import Policy
    from selfplay.reporting import quiet_libraries
    from selfplay.trainer import Trainer

    quiet_libraries()
    torch.set_num_threads(threads)
    policy = Policy(cfg, Path(base_path))
    trainer = Trainer(policy, cfg)
    warm = not cfg.trainer.compile
    while True:
        try:
            kind, msg = conn.recv()
        except (EOFError, KeyboardInterrupt):  # the main process is gone
            return
        if kind == "stop":
            return
        try:
            if kind == "step":
                roles = list(msg["rows"])  # the roles it trains: the main process may keep the tutor
                m = {}
                for role in roles:
                    m.update(trainer.step(role, msg["rows"][role], msg["caps"][role]))
                out = {"metrics": m, "weights": adapter_vectors(policy, roles),
                       "versions": {r: trainer.versions[r] for r in roles}}
            elif kind == "state":
                out = _dumps(trainer.state())
            elif kind == "load":
                load_adapter_vectors(policy, msg["weights"])
                if msg.get("trainer"):
                    trainer.load(_loads(msg["trainer"]))
                out = None
            else:
                raise ValueError(f"unknown request {kind!r}")
            conn.send((True, out))
            if not warm:  # after the first reply (the main process's `load`), while it evaluates the base
                warm = True
                trainer.warm_up("student")
        except Exception as e:  # noqa: BLE001 - every failure goes back to the main process
            conn.send((False, f"{type(e).__name__}: {e} ({traceback.extract_tb(e.__traceback__)[-1].name})"))
