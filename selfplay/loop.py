"""The self-play loop. One iteration, top to bottom:

    sample tasks -> run episodes (attempt, verify, hint, mutate, judge) -> rewards (in the turns)
    -> advantages per (role x turn kind) group (+ hindsight rows from failed attempts)
    -> update student -> update tutor
    -> write memory (one transaction) -> log -> checkpoint

Compute accounting (for equal-compute comparisons, tutor included): selfplay/compute.py. The run
dir and its lock: selfplay/rundir.py. The logged metrics of the turns: selfplay/metrics.py.

Overlap (`trainer.policy_lag: 1`): step 4 hands the rows to a learner process and installs the
weights of the previous iteration's update instead, so the next rollout runs while this update
does and samples one update behind (selfplay/learner.py); the ratio to the behaviour log-probs
and its clip correct for that. The learner updates the student; this process updates the tutor
when its next rollout is done, before it waits for the learner, so the two processes' work is
closer to even (with separate adapters). Evaluations and checkpoints wait for the pending update
first.

Crash safety: memory holds whole iterations only; checkpoints (adapters, optimizers, RNG states,
curriculum, counters) are written every `checkpoint_every` iterations by rename, and at the
budget's end (compute.budget_share). `resume` restores the checkpoint and drops memory rows
written after it, then replays those iterations.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
from pathlib import Path

import torch

from memory.store import EpisodeStore
from selfplay import distributed as dist
from selfplay import grpo
from selfplay.compute import budget_share, count_tokens, flops
from selfplay.config import RunConfig
from selfplay.curriculum import Curriculum
from selfplay.evaluate import compare, evaluate, heldout_tasks
from selfplay.generator import Generator, TorchBackend
from selfplay.graph import build_graph, episode_input, run_episodes, unhinted_attempt
from selfplay.learner import Learner, adapter_vectors, load_adapter_vectors
from selfplay.metrics import goodhart, hint_collapse, turn_metrics
from selfplay.policy import Policy
from selfplay.prompts import Prompts
from selfplay.reporting import read_metrics
from selfplay.rundir import RunError, lock_run_dir, prepare_dir, unlock_run_dir
from selfplay.trainer import Row, Trainer


DB_FIELDS = ("episode_id", "iteration", "role", "kind", "adapter", "adapter_version", "group_id", "hint_round", "hint", "prompt",
             "completion", "parsed", "verdict", "reward", "advantage", "prompt_tokens", "completion_tokens", "judge")


def make_backend(cfg: RunConfig, policy: Policy, workdir: Path | None = None, rank: int = 0):
    """The generation backend; `workdir` holds the adapter versions a vLLM engine loads; each
    torchrun rank samples its own stream (seed + rank)."""
    if cfg.model.backend == "vllm":
        from selfplay.vllm_backend import VLLMBackend  # imported only when selected

        return VLLMBackend(policy, cfg, workdir)
    if cfg.model.backend == "vllm_server":
        from selfplay.vllm_server import VLLMServerBackend

        return VLLMServerBackend(policy, cfg, workdir)
    return TorchBackend(policy, cfg.generation.temperature, cfg.generation.top_k, cfg.seed + 1_000_003 * rank,
                        cfg.generation.compile)


class SelfPlay:
    """Everything a run holds; `iteration()` is the algorithm, the rest is plumbing."""

    def __init__(self, cfg: RunConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.rank, self.world = dist.rank(), dist.world()
        threads = cfg.model.threads
        lag = cfg.trainer.policy_lag if self.world == 1 else 0  # torchrun ranks all-reduce in step: synchronous
        torch.set_num_threads(max(1, threads - threads // 2) if lag else threads)  # the learner takes the rest
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.prompts = Prompts(cfg.prompts)
        self.policy = Policy(cfg)
        self.backend = make_backend(cfg, self.policy, out / ("vllm-adapters" + (f"-rank{self.rank}" if self.world > 1 else "")),
                                    self.rank)
        self.gen = Generator(self.policy, self.backend, cfg.generation.max_batch)
        self.heldout = heldout_tasks(cfg.eval)
        self.curriculum = Curriculum(cfg, {t.key for t in self.heldout})
        self.trainer = Trainer(self.policy, cfg)  # with policy_lag 1 the learner's twin steps; this one keeps the versions
        self.learner = Learner(cfg, self.policy, max(1, threads // 2)) if lag else None
        # policy_lag 1: the learner trains the student; this process trains the tutor once it is
        # done sampling (it waits for the learner then anyway), unless the two share one adapter
        self.tutor_here = bool(lag) and cfg.trainer.train_tutor and not cfg.lora.shared
        self.tutor_rows: tuple | None = None  # (rows, cap) of the pending tutor update
        self.skipped0 = 0  # both processes start their skip counters from the checkpoint's
        self.env = {"solver_calls": 0, "solver_seconds": 0.0}  # the environment's compute (cumulative)
        self.graph = build_graph(cfg, self.gen, self.prompts, self.trainer.versions,
                                 {t.key for t in self.heldout}, self.env)
        self.loop = asyncio.new_event_loop()  # one for the run: asyncio.run's setup cost 0.15 ms an iteration
        self.store = EpisodeStore(out / "memory.db") if self.rank == 0 else None  # rank 0 owns the store
        self.totals = {f"{k}/{r}{s}": 0 for r in ("student", "tutor")
                       for k, s in (("samples", ""), ("tokens", "_gen"), ("tokens", "_train"), ("tokens", "_ref"))}
        self.totals["time/seconds"] = 0.0
        self.iteration_done = 0

    # ---------------------------------------------------------------- the algorithm

    def iteration(self, it: int) -> dict[str, float]:
        cfg, t0 = self.cfg, time.perf_counter()
        # 1. sample tasks (rank 0's curriculum decides for every rank)
        assignments = dist.broadcast(self.curriculum.next(it) if self.rank == 0 else None)
        # 2. run episodes: rollouts, verification and every turn's reward happen in the graph;
        #    under torchrun each rank runs every world-th episode and all ranks see all turns
        inputs = [episode_input(f"{it}.{k}", it, a.task, a.mutate_group, self.progress(it))
                  for k, a in enumerate(assignments)]
        gen_s0 = self.gen.seconds
        mine = self.loop.run_until_complete(run_episodes(self.graph, inputs[self.rank::self.world], cfg.graph.concurrency))
        t_rollout = time.perf_counter() - t0
        local_tokens = sum(t["completion_tokens"] for s in mine for t in s["turns"])
        states = dist.unshard(dist.all_gather(mine))
        local = {s["episode_id"] for s in mine}
        turns = [t for s in states for t in s["turns"]]
        # 3. advantages per (role, kind, group): never across roles or turn kinds
        groups = [advantage_group(t, cfg.trainer.hint_baseline) for t in turns]
        adv, keep = grpo.group_advantages([t["reward"] for t in turns], groups, cfg.trainer.scale_std,
                                          cfg.trainer.drop_zero_variance)
        if cfg.trainer.judge_class_balance:  # verdicts on right and wrong attempts weigh the same
            adv = grpo.class_balanced(adv, [t["verdict"] if t["kind"] == "judge" else None for t in turns])
        rows = {"student": [], "tutor": []}  # every rank's rows (for the FLOP count) ...
        mine_rows = {"student": [], "tutor": []}  # ... and this rank's, which it trains on
        hint_only = {}  # (group, hint) -> the one NLL row that stands for a flat group's solved attempts
        for t, a, k in zip(turns, adv, keep):
            t["advantage"] = a
            hinted = t["kind"] == "attempt" and t["hint_round"] > 0
            if hinted and not cfg.trainer.train_on_hinted:
                continue
            nll = t["forced"] > 0 and t["verdict"] == "solved"  # imitate a hint prefix that led to a solution
            if hinted and not cfg.trainer.hinted_pg:
                k = False  # no policy gradient on a hinted state: its hint tokens' NLL only (below)
            if k:
                row = Row(t["prompt_ids"], t["completion_ids"], a, t["behaviour_logprobs"], t["forced"], nll)
            elif nll and cfg.trainer.hint_nll > 0:  # a flat group has no policy gradient: only its hint
                # tokens are trained (the NLL term), once per distinct hint with the count as weight
                hint = t["completion_ids"][:t["forced"]]
                key = (t["group_id"], tuple(hint))  # a group shares its prompt (and, hinted, its hint)
                if key in hint_only:
                    hint_only[key].weight += 1
                    continue
                row = hint_only[key] = Row(t["prompt_ids"], hint, 0.0, [0.0] * len(hint), len(hint), True)
            elif t["role"] == "tutor" and cfg.trainer.tutor_kl_coef > 0:  # no signal, but the KL sees it
                row = Row(t["prompt_ids"], t["completion_ids"], 0.0, t["behaviour_logprobs"], pg=False)
            else:
                continue
            rows[t["role"]].append(row)
            if t["episode_id"] in local:
                mine_rows[t["role"]].append(row)
        if not cfg.trainer.train_tutor:
            rows["tutor"], mine_rows["tutor"] = [], []
        relabelled = hindsight_rows(turns)  # failed attempts, relabelled as solved tasks
        for row, episode in relabelled:
            rows["student"].append(row)
            if episode in local:
                mine_rows["student"].append(row)
        # 4. update student, then tutor (separate adapters, separate optimizers)
        t1 = time.perf_counter()
        caps = {"student": cfg.generation.max_new_tokens, "tutor": cfg.generation.tutor_max_new_tokens}
        if self.learner:  # policy_lag 1: update it-1 ran beside this rollout; update it runs beside the next
            m = self.install_update(it)  # its metrics are update it-1's
            if self.tutor_here:
                self.tutor_rows = (mine_rows["tutor"], caps["tutor"])
                self.learner.submit({"student": mine_rows["student"]}, caps)
            else:
                self.learner.submit(mine_rows, caps)
        else:
            self.backend.sleep()
            m = self.trainer.step("student", mine_rows["student"], caps["student"])
            if cfg.trainer.train_tutor:
                m.update(self.trainer.step("tutor", mine_rows["tutor"], caps["tutor"]))
            self.backend.sync_adapters(it)
        t_train = time.perf_counter() - t1
        # 5. memory, curriculum feedback, metrics
        m.update(self._account(turns, rows))
        m.update(turn_metrics(turns))
        if cfg.trainer.hindsight_nll > 0:
            m["student/hindsight_rows"] = len(relabelled)
        if self.rank == 0:
            self._record(it, states, turns)
        dt = time.perf_counter() - t0
        keys = sorted(self.env)
        m.update({f"env/{k}": v for k, v in zip(keys, dist.all_sum([self.env[k] for k in keys]))})
        m.update({f"rollout/{k}": v for k, v in getattr(self.backend, "retries", {}).items()})  # vllm_server
        m.update({"rollout/tokens_per_s": dist.all_sum([local_tokens / max(self.gen.seconds - gen_s0, 1e-9)])[0],
                  "time/samples_per_s": len(turns) / dt,
                  "time/rollout_s": t_rollout, "time/train_s": t_train, "time/iteration_s": dt,
                  "rollout/episodes_per_s": len(states) / t_rollout})
        self.totals["time/seconds"] += dt
        return m

    def install_update(self, it: int) -> dict[str, float]:
        """policy_lag 1: wait for the learner's pending update and write its weights into this
        process's policy and sampler; returns that update's metrics ({} when none is pending).
        Evaluations and checkpoints call it first, so they see every update so far."""
        m = {}
        if self.tutor_rows is not None:  # the tutor's update it-1, here, from its weights after update it-2
            rows, cap = self.tutor_rows
            self.tutor_rows = None
            m = self.trainer.step("tutor", rows, cap)
        out = self.learner.collect() if self.learner else None
        if out is None:
            return m
        load_adapter_vectors(self.policy, out["weights"])  # the roles the learner trains
        self.trainer.versions.update(out["versions"])  # in place: the episode graph holds this dict
        self.backend.sync_adapters(it)
        return {**out["metrics"], **m}

    def _account(self, turns: list[dict], rows: dict) -> dict[str, float]:
        t = self.cfg.trainer
        for k, v in count_tokens(turns, rows, t.epochs, {"student": t.kl_coef > 0, "tutor": t.tutor_kl_coef > 0}).items():
            self.totals[k] = self.totals.get(k, 0) + v
        return {**self.totals, **self.flops()}

    def flops(self) -> dict[str, float]:
        return flops(self.policy.n_params, self.totals)

    def progress(self, it: int) -> float:
        """Share of the run's budget spent before iteration `it` (`budget_share`)."""
        return budget_share(self.cfg, it - 1, self.totals["samples/student"], self.flops()["flops/total"])

    def budget_spent(self) -> bool:
        c = self.cfg
        return bool((c.max_student_samples and self.totals["samples/student"] >= c.max_student_samples)
                    or (c.max_total_flops and self.flops()["flops/total"] >= c.max_total_flops))

    def _record(self, it: int, states: list[dict], turns: list[dict]) -> None:
        """Curriculum feedback and the episode store (rank 0)."""
        tasks, episodes = [], []
        for s in states:
            cur = s["current"]
            unhinted = [t for t in s["turns"] if unhinted_attempt(t)]
            solved = sum(t["verdict"] == "solved" for t in unhinted)
            self.curriculum.update(cur, len(unhinted), solved, it)
            tasks.append({"id": cur.id, "key": cur.key, "numbers": json.dumps(cur.numbers), "target": cur.target,
                          "parent": cur.parent, "source": cur.source, "first_iteration": it,
                          "attempts": len(unhinted), "solved": solved})
            episodes.append({"id": s["episode_id"], "iteration": it, "task_id": cur.id,
                             "parent_task_id": s["task"].id if s["mutate"] else None, "mutated": int(s["mutate"]),
                             "solved": int(s["solved"]), "hint_rounds": s["hint_round"], "n_turns": len(s["turns"])})
        db_turns = [{k: t.get(k) for k in DB_FIELDS} for t in turns]
        self.store.write_iteration(it, tasks, episodes, db_turns, turn_metrics(turns))

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self, it: int) -> None:
        """Every rank calls it (each rank's sampler state is gathered); rank 0 writes."""
        self.install_update(it)
        backend_rngs, envs = zip(*dist.all_gather((self.backend.rng_state(), dict(self.env))))
        if self.rank != 0:
            return
        new, cur, old = (self.out / n for n in ("checkpoint.new", "checkpoint", "checkpoint.old"))
        shutil.rmtree(new, ignore_errors=True)
        self.policy.save_adapters(new / "adapters")
        trainer = self.learner.state() if self.learner else self.trainer.state()
        if self.tutor_here:  # the tutor's optimizer and version live in this process
            here = self.trainer.state()
            trainer["opt"]["tutor"], trainer["versions"]["tutor"] = here["opt"]["tutor"], here["versions"]["tutor"]
            trainer["skipped"] += here["skipped"] - self.skipped0
        torch.save({"iteration": it, "trainer": trainer, "totals": self.totals, "envs": list(envs),
                    "curriculum": self.curriculum.state(), "torch_rng": torch.get_rng_state(),
                    "python_rng": random.getstate(), "backend_rngs": list(backend_rngs)}, new / "state.pt")
        if cur.exists():
            shutil.rmtree(old, ignore_errors=True)
            cur.rename(old)
        new.rename(cur)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> int:
        for name in ("checkpoint", "checkpoint.old"):
            d = self.out / name
            if (d / "state.pt").is_file():
                break
        else:
            return 0
        st = torch.load(d / "state.pt", weights_only=False)
        self.policy.load_adapters(d / "adapters")
        self.backend.sync_adapters(st["iteration"])
        self.trainer.load(st["trainer"])
        self.skipped0 = self.trainer.skipped
        if self.learner:
            self.learner.load(st["trainer"], adapter_vectors(self.policy))
        self.curriculum.load(st["curriculum"])
        torch.set_rng_state(st["torch_rng"])
        random.setstate(st["python_rng"])
        rngs = st.get("backend_rngs") or [st["backend_rng"]]  # older checkpoints: one process
        if len(rngs) != self.world:
            raise RunError(f"the checkpoint was written by {len(rngs)} process(es); resume with as many (now {self.world})")
        self.backend.set_rng_state(rngs[self.rank])
        self.totals = st["totals"]
        envs = st.get("envs") or [st.get("env", {})]  # per rank (older checkpoints: one process)
        self.env.update(envs[self.rank])  # in place: the graph holds this dict
        return st["iteration"]

    def close(self) -> None:
        if self.learner:
            self.learner.close()
        self.backend.close()
        self.loop.close()
        if self.store:
            self.store.close()


def advantage_group(turn: dict, hint_baseline: str) -> tuple:
    """The GRPO group a turn's advantage is normalised in: never across roles or turn kinds. With
    `trainer.hint_baseline: batch` every hint of the iteration is one group (a lone hint per failed
    group would otherwise have no baseline)."""
    if hint_baseline == "batch" and turn["kind"] == "hint":
        return (turn["role"], turn["kind"])
    return (turn["role"], turn["kind"], turn["group_id"])


def hindsight_rows(turns: list[dict]) -> list[tuple[Row, str]]:
    """(row, episode id) per distinct (relabelled prompt, completion): the whole completion is the
    target of the hindsight NLL term (`forced` = its length, so no policy-gradient token)."""
    seen, out = set(), []
    for t in turns:
        ids = t.get("hindsight_ids")
        key = ids and (tuple(ids), tuple(t["completion_ids"]))
        if key and key not in seen:
            seen.add(key)
            n = len(t["completion_ids"])
            out.append((Row(ids, t["completion_ids"], 0.0, [0.0] * n, n, hindsight=True), t["episode_id"]))
    return out


def run(cfg: RunConfig | None, out: Path, resume: bool = False, console=None, quiet: bool = False) -> dict:
    """`selfplay run`: train, evaluating before and after; returns the summary. Under torchrun every
    rank calls it; rank 0 prepares the directory, builds the base, evaluates, logs and checkpoints."""
    from selfplay.reporting import code_version

    code = code_version()  # at the start: the code this process imported (a cell started mid-edit has the edit)
    dist.init((cfg or prepare_dir(out, None, True)).model.device)  # resume: the run's own config
    lead = dist.rank() == 0
    try:
        return _run(cfg, out, resume, console, quiet, lead, code)
    finally:  # however it ends: a notebook that caught its error can start or resume the dir again
        unlock_run_dir(out)


def _run(cfg: RunConfig | None, out: Path, resume: bool, console, quiet: bool, lead: bool, code: str) -> dict:
    from selfplay.policy import ensure_base

    try:
        if lead:
            if not resume:
                out.mkdir(parents=True, exist_ok=True)
            if not resume or (out / "config.yaml").is_file():  # before the dir is checked or written
                lock_run_dir(out)
            cfg = prepare_dir(out, cfg, resume)
            ensure_base(cfg)  # once, before the other ranks load it
        shared = dist.broadcast((cfg, None))
    except Exception as e:  # the other ranks must not wait forever for a config
        dist.broadcast((None, f"{type(e).__name__}: {e}"))
        raise
    cfg, err = shared
    if err:
        raise RunError(f"rank 0 failed: {err}")
    if quiet or not lead:
        cfg.logging.progress, cfg.logging.log_every = False, 0
    sp = SelfPlay(cfg, out)
    try:
        summary = _train(sp, cfg, out, resume, console, lead, code)
    finally:  # an error too: the learner process stops and the store closes; every finished iteration is stored
        sp.close()
    dist.shutdown()
    return summary


def _train(sp: SelfPlay, cfg: RunConfig, out: Path, resume: bool, console, lead: bool, code: str) -> dict:
    """Evaluate the base, run the iterations to the budget (checkpointing), evaluate, summarise."""
    from selfplay.reporting import Progress, RunLogger

    start = 0
    if resume:
        start = sp.load_checkpoint()
        if lead:
            sp.store.truncate_after(start)
    if lead:
        sp.store.start_run(out.name, cfg.model_dump(mode="json"))
        logger = RunLogger(out, cfg, console, resume_from=start if resume else None)
        before_path = out / "eval_before.json"
        if before_path.is_file():
            before = json.loads(before_path.read_text())
        else:  # iteration 0: LoRA B = 0, so the student is the base
            before = evaluate(sp.policy, sp.backend, sp.prompts, sp.heldout, cfg)
            before_path.write_text(json.dumps(before))
            logger.log_eval(0, before, "before")
    with Progress(cfg, start, console, sp.progress(start + 1)) as bar:
        for it in range(start + 1, cfg.iterations + 1):
            if sp.budget_spent():  # the totals are global, so every rank stops together
                break
            m = sp.iteration(it)
            if lead:
                logger.log(it, m)
                bar.update(it, m, sp.progress(it + 1))
            if lead and cfg.eval.every and it % cfg.eval.every == 0:
                sp.install_update(it)
                ev = evaluate(sp.policy, sp.backend, sp.prompts, sp.heldout, cfg, judge_attempts=0)
                sp.store.write_metrics(it, {"eval/solve_rate": ev["solve_rate"],
                                            "eval/greedy_solve_rate": ev["greedy_solve_rate"]})
                logger.log_eval(it, ev, "eval")
            if it % cfg.logging.checkpoint_every == 0:
                sp.save_checkpoint(it)
            sp.iteration_done = it
    last = sp.iteration_done or start
    sp.save_checkpoint(last)
    keys = sorted(sp.env)
    env = dict(zip(keys, dist.all_sum([sp.env[k] for k in keys])))  # every rank's solver work
    summary = None
    if lead:
        after = evaluate(sp.policy, sp.backend, sp.prompts, sp.heldout, cfg)
        (out / "eval_after.json").write_text(json.dumps(after))
        logger.log_eval(last, after, "after")
        summary = {"iterations": last, "before": _strip(before), "after": _strip(after),
                   "improvement": compare(before, after), "totals": dict(sp.totals),
                   "flops": sp.flops(), "env": env, "processes": sp.world, "code": code}
        rows = read_metrics(out)
        if cfg.rewards.student_source == "judge":
            summary["goodhart"] = goodhart(rows)
        if cfg.graph.hint and cfg.graph.hint_source == "tutor" and cfg.trainer.train_tutor:
            summary["hint_collapse"] = hint_collapse(rows)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        sp.store.set_status(out.name, "finished")
        logger.finish(summary)
    return dist.broadcast(summary)


def _strip(ev: dict) -> dict:
    return {k: v for k, v in ev.items() if k != "per_task"}
