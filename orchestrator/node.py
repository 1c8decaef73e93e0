"""The node runner: the same code on every backend, run once per node.

stage shards -> restore compile cache -> torchrun the trainer once per seed -> upload each seed's
artifacts (manifest last) -> save compile cache. Exit code 0: every seed done; 75: preempted after a
checkpoint (the backend requeues and this resumes); 1: a seed failed after its retries.

    python -m orchestrator.node --plan PLAN.json [--node-rank R --nnodes N --master-addr A --master-port P]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from orchestrator.compile_cache import compile_cache_env, ptxas_env
from orchestrator.config import REPO_ROOT, expand
from orchestrator.node_cache import SweepCaches, hold
from orchestrator.plan import LaunchPlan
from orchestrator.provenance import environment_record
from orchestrator.sweep import (EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, Ending, SeedState, next_action, seed_dir,
                                seed_prefix, seed_timings, trainer_outcome)
from orchestrator.sweep import seed_done as is_seed_done
from orchestrator.workdir import ShippedCodeMissing
from trainer.startup import SEED_STARTED_ENV

log = logging.getLogger(__name__)


def apply_launch_env(environ: Mapping[str, str], launch: Mapping[str, str | None]) -> dict[str, str]:
    """A copy of environ with the launcher's values of plan.LAUNCH_ENV_KEYS put back (None: unset)."""
    env = dict(environ)
    for k, v in launch.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


@dataclass
class NodeEnvironment:
    """Where this node sits in the run; filled by the backend (submitit JobEnvironment, Ray bundle, local)."""

    node_rank: int = 0
    nnodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_first(self) -> bool:
        return self.node_rank == 0


@dataclass
class SeedOutcome:
    seed: int
    state: str  # succeeded | failed | preempted | skipped
    exit_code: int | None = None
    attempts: int = 0
    reason: str = ""
    upload_pending: bool = False  # trained, but its artifacts still wait in the spool
    timings: dict = field(default_factory=dict)


def stop_at_time_limit(proc: subprocess.Popen, timed_out: threading.Event, grace_s: float = 30.0) -> None:
    """The seed's time is up: SIGTERM (torchrun passes it to its workers), SIGKILL if it outlives the grace."""
    timed_out.set()
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()


class NodeRunner:
    def __init__(self, plan: LaunchPlan, node: NodeEnvironment | None = None, console: Console | None = None):
        self.plan = plan
        self.node = node or NodeEnvironment()
        # markup off: "[node]" and the trainer's own lines are plain text, not rich markup
        self.console = console or Console(highlight=False, soft_wrap=True, markup=False)
        self.work = expand(plan.cluster.work_dir) / plan.sweep_id
        self._current_out: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._store = None
        self.data_info: dict = {}
        self.caches = SweepCaches(plan, lambda: self.store, self.console, self.node.is_first)
        self._shipped: list[str] = []  # the workdir's files in the seed's script folder: in the store already

    # ---------------------------------------------------------------- store (node 0 uploads)
    @property
    def store(self):
        if self._store is None:
            from orchestrator.store import open_store

            self._store = open_store(self.plan.store_url)
        return self._store

    def seed_prefix(self, seed: int) -> str:
        return seed_prefix(self.plan.sweep_id, seed)

    def seed_done(self, seed: int) -> bool:
        from orchestrator.artifacts import read_manifest

        m = read_manifest(self.store, self.seed_prefix(seed))
        return is_seed_done(m is not None, m.state if m else None)

    # ---------------------------------------------------------------- preemption
    def request_checkpoint(self, timeout_s: float = 300.0) -> bool:
        """Ask the running trainer to checkpoint and exit 75; wait for it. True if it did."""
        self._stop.set()
        out, proc = self._current_out, self._proc
        if out is None or proc is None or proc.poll() is not None:
            return False
        (out / "CHECKPOINT_NOW").touch()
        try:
            return proc.wait(timeout=timeout_s) == EXIT_PREEMPTED
        except subprocess.TimeoutExpired:
            return False

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum, _frame):
            log.warning("signal %s: asking the trainer to checkpoint", signum)
            threading.Thread(target=self.request_checkpoint, daemon=True).start()

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, on_signal)

    # ---------------------------------------------------------------- steps
    def stage(self):
        from orchestrator.data.stage import stage_shards

        d = self.plan.job.data
        dest = expand(self.plan.data_dir)
        res = stage_shards(d.source, dest, train_shards=d.train_shards, val_shards=d.val_shards,
                           progress=self.console.is_terminal, console=self.console)
        self.data_info = dict(res.info or {})
        rate = self.data_info.get("entropy_rate_nats")
        self.console.print(f"[node] staged {len(res.train_files)} train + {len(res.val_files)} val shards "
                           f"in {dest} ({res.bytes_fetched / 1e6:.1f} MB fetched, {res.seconds:.1f}s)")
        if rate is not None:
            self.console.print(f"[node] synthetic source entropy rate: {rate:.4f} nats/token "
                               f"(the best achievable val loss; ln(50257) = 10.8249)")
        return res

    def trainer_config(self, seed: int) -> dict:
        job = self.plan.job
        cfg = dict(job.trainer)
        cfg.update(seed=seed, checkpoint_every=job.checkpoint.every, checkpoint_final=job.checkpoint.final,
                   device=self.plan.cluster.device)
        return cfg

    def torchrun_argv(self, seed: int, out: Path, data_dir: Path) -> tuple[list[str], Path]:
        c, n = self.plan.cluster, self.node
        run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={c.gpus_per_node}"]
        if n.nnodes == 1:
            run.append("--standalone")
        else:
            run += [f"--nnodes={n.nnodes}", f"--node_rank={n.node_rank}",
                    f"--master_addr={n.master_addr}", f"--master_port={n.master_port}"]
        job = self.plan.job
        if job.script:
            return self._script_argv(run, out, data_dir), out
        cfg_path = out / "trainer_config.json"
        cfg_path.write_text(json.dumps(self.trainer_config(seed), indent=2))
        argv = run + ["-m", "trainer", "--data-dir", str(data_dir), "--out-dir", str(out),
                      "--seed", str(seed), "--config", str(cfg_path)]
        if any((out / "ckpt").glob("*.pt")):
            argv += ["--resume", "auto"]
        return argv, REPO_ROOT

    def _script_argv(self, run: list[str], out: Path, data_dir: Path) -> list[str]:
        """An external modded-nanogpt train_gpt.py, run in its shipped folder (workdir.prepare_script_dir)."""
        from orchestrator.workdir import prepare_script_dir

        if not self.plan.workdir:
            raise RuntimeError("the plan names a script but ships no workdir (launched by an older speedrun?); "
                               "launch the job again")
        self._shipped = prepare_script_dir(self.store, self.plan.workdir, out / "script", data_dir,
                                           self.plan.job.script_dirs, self.caches.shipped)
        return run + [self.plan.workdir["entry"], *self.plan.job.script_args]

    def child_env(self, seed: int) -> dict[str, str]:
        # the launcher's thread counts, whoever submitted this job (plan.LAUNCH_ENV_KEYS); the configs' env wins
        env = apply_launch_env(os.environ, self.plan.launch_env)
        env.update(self.plan.cluster.env)
        env.update(self.plan.job.env)
        env["PYTHONUNBUFFERED"] = "1"
        env["SPEEDRUN_SWEEP_ID"] = self.plan.sweep_id
        env["SPEEDRUN_SEED"] = str(seed)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        chosen = {**self.plan.cluster.env, **self.plan.job.env}
        for k, v in compile_cache_env(self.caches.cache_root).items():
            if k not in chosen:   # the node's own variable (torch sets TORCHINDUCTOR_CACHE_DIR itself) must not win
                env[k] = v
        env.update(ptxas_env(env))   # after the configs: a TRITON_PTXAS_PATH of theirs stays
        if self.plan.job.script:
            rundir = self.work / seed_dir(seed) / "script"
            if "DATA_PATH" not in chosen:
                env["DATA_PATH"] = str(rundir)  # records read DATA_PATH/data/fineweb10B/*.bin
        if self.caches.offline_dir is not None:   # a record script's fetches, or our trainer's GPT-2 vocabulary
            from orchestrator.offline import node_env

            env.update(node_env(self.caches.offline_dir, self.plan.job.offline))
        if self.plan.cluster.device == "cpu":
            # one gloo rank per core share; oversubscribed threads make small CPU runs several times slower
            per_rank = max(1, (os.cpu_count() or 1) // self.plan.cluster.gpus_per_node)
            env.setdefault("OMP_NUM_THREADS", str(per_rank))
        return env

    def run_seed_once(self, seed: int, out: Path, data_dir: Path) -> tuple[int, dict]:
        """One torchrun of one seed, its output teed to train.log and the console."""
        from orchestrator.log_sync import LogSync

        argv, cwd = self.torchrun_argv(seed, out, data_dir)
        if self.plan.job.script:
            cwd = out / "script"
        (out / "CHECKPOINT_NOW").unlink(missing_ok=True)
        env = self.child_env(seed)
        started = time.time()
        env[SEED_STARTED_ENV] = f"{started:.3f}"   # the trainer logs what torchrun's start took of its warm-up
        first_step_at, timed_out, timer = None, threading.Event(), None
        log_path = out / "train.log"
        sync = LogSync(self.store, log_path, f"{self.seed_prefix(seed)}/train.log",
                       every_s=self.plan.job.log_sync_seconds) if self.node.is_first else None
        with open(log_path, "a", buffering=1) as logf:
            if sync:
                sync.start()
            try:
                self._current_out = out
                self._proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True, bufsize=1)
                limit = self.plan.job.seed_time_limit_min
                timer = threading.Timer(limit * 60, stop_at_time_limit, (self._proc, timed_out)) if limit else None
                if timer:
                    timer.daemon = True
                    timer.start()
                assert self._proc.stdout is not None
                for line in self._proc.stdout:
                    logf.write(line)
                    if first_step_at is None and line.startswith("step:1/"):
                        first_step_at = time.time()
                    self.console.print(line.rstrip("\n"), markup=False, highlight=False)
                rc = self._proc.wait()
            finally:
                if timer:
                    timer.cancel()
                self._proc = None
                if sync:
                    sync.stop()
        return rc, {"started_unix": started, "first_step_unix": first_step_at, "ended_unix": time.time(),
                    "timed_out": timed_out.is_set()}

    def write_seed_records(self, seed: int, out: Path, outcome: SeedOutcome, run_t: dict, upload_s: float) -> None:
        tt = {}
        if (out / "trainer_timings.json").is_file():
            tt = json.loads((out / "trainer_timings.json").read_text())
        outcome.timings = seed_timings(self.plan.created_at, tt, run_t, upload_s, time.time(), state=outcome.state,
                                       reason=outcome.reason, exit_code=outcome.exit_code, attempts=outcome.attempts)
        (out / "timings.json").write_text(json.dumps(outcome.timings, indent=2))
        record = environment_record(self.plan, self.data_info, env=self.child_env(seed))
        (out / "env.json").write_text(json.dumps(record, indent=2))

    def upload_seed(self, seed: int, out: Path, outcome: SeedOutcome, run_t: dict) -> None:
        """One upload pass: the seed's files, then its records (timings.json states that pass's time), then
        the manifest."""
        from orchestrator.artifacts import SeedUploader

        records = ("timings.json", "env.json")
        for name in records:  # an earlier attempt's records are replaced, not uploaded first
            (out / name).unlink(missing_ok=True)

        def write_records(upload_s: float) -> dict[str, bytes]:
            self.write_seed_records(seed, out, outcome, run_t, upload_s=upload_s)
            return {name: (out / name).read_bytes() for name in records}

        SeedUploader(self.store, self.work / "spool").upload_seed(
            out, self.seed_prefix(seed), keep_last_ckpt=self.plan.job.checkpoint.keep_last, state=outcome.state,
            closing=write_records, skip=[f"script/{name}" for name in self._shipped])

    def run_seed(self, seed: int, data_dir: Path) -> SeedOutcome:
        out = self.work / seed_dir(seed)
        out.mkdir(parents=True, exist_ok=True)
        outcome = SeedOutcome(seed=seed, state=SeedState.FAILED.value)
        run_t: dict = {}
        while True:
            outcome.attempts += 1
            self.console.print(f"[node] seed {seed}: attempt {outcome.attempts}, torchrun x{self.plan.cluster.gpus_per_node}"
                               f"{'' if self.node.nnodes == 1 else f' on node {self.node.node_rank}/{self.node.nnodes}'}")
            rc, run_t = self.run_seed_once(seed, out, data_dir)
            outcome.exit_code = rc
            outcome.state = trainer_outcome(rc, self._stop.is_set()).value
            if run_t["timed_out"]:
                outcome.state = SeedState.FAILED.value
                outcome.reason = f"stopped at the job's seed_time_limit_min ({self.plan.job.seed_time_limit_min:g} min)"
                self.console.print(f"[node] seed {seed}: {outcome.reason}; not retried", markup=False)
                break
            if outcome.state == SeedState.SUCCEEDED:
                break
            if outcome.state == SeedState.PREEMPTED:
                return outcome  # no upload: the requeued run resumes this seed from its checkpoint
            tail = "".join((out / "train.log").read_text(errors="replace").splitlines(True)[-15:])
            outcome.reason = f"trainer exited with code {rc}"
            self.console.print(f"[node] seed {seed} failed ({outcome.reason}); last lines of train.log:\n{tail}",
                               markup=False)
            # a trainer that failed is this node runner's to retry; the backend retries only dead node runners
            if next_action(Ending.DIED, [seed], outcome.attempts - 1, self.plan.job.retries).action != "retry":
                break
        if self.node.is_first:
            from orchestrator.store import StoreError

            try:
                self.upload_seed(seed, out, outcome, run_t)
            except StoreError as e:  # the files wait in the spool; the next seeds still run
                outcome.upload_pending = True
                self.console.print(f"[node] seed {seed}: {outcome.state}, but its upload is unfinished ({e}); "
                                   f"the files wait in {self.work / 'spool'}: run `speedrun collect "
                                   f"{self.plan.sweep_id}` to finish it", markup=False)
                return outcome
            self.console.print(f"[node] seed {seed}: {outcome.state}; artifacts in "
                               f"{self.store.url(self.seed_prefix(seed))}/", markup=False)
        return outcome

    def run(self) -> int:
        self.work.mkdir(parents=True, exist_ok=True)
        self._install_signal_handlers()
        self.console.print(f"[node] {self.plan.sweep_id}: node {self.node.node_rank}/{self.node.nnodes} on "
                           f"{socket.gethostname()}, seeds {self.plan.seeds}")
        self.caches.mark_shipped_used()
        staged = self.stage()
        with hold(self.caches.entries()):   # another sweep's pruning on this node leaves them alone
            self.caches.restore_offline()
            self.caches.restore_compile_cache()
            outcomes = []
            for seed in self.plan.seeds:
                if self._stop.is_set():
                    return EXIT_PREEMPTED
                if self.node.is_first and self.seed_done(seed):
                    self.console.print(f"[node] seed {seed}: already complete in the store, skipped")
                    continue
                o = self.run_seed(seed, staged.dest)
                if o.state == SeedState.PREEMPTED:
                    self.console.print(f"[node] seed {seed}: checkpointed for preemption; resume by running again")
                    return EXIT_PREEMPTED
                outcomes.append(o)
            self.caches.save_compile_cache()
            self.caches.prune_store_code()
            self.caches.prune_node()
        failed = [o.seed for o in outcomes if o.state != SeedState.SUCCEEDED]
        pending = [o.seed for o in outcomes if o.upload_pending]
        if failed or pending:
            self.console.print(f"[node] failed seeds: {failed or 'none'}; seeds waiting in the spool: {pending or 'none'}")
            return EXIT_FAILED
        self.console.print("[node] all seeds done")
        return EXIT_OK


def run_node(plan: LaunchPlan, node: NodeEnvironment | None = None) -> int:
    return NodeRunner(plan, node).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orchestrator.node", description=__doc__.splitlines()[0])
    ap.add_argument("--plan", required=True, type=Path)
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("--nnodes", type=int, default=1)
    ap.add_argument("--master-addr", default="127.0.0.1")
    ap.add_argument("--master-port", type=int, default=29500)
    ap.add_argument("--exit-file", type=Path, help="write the exit code here when done (local backend)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    plan = LaunchPlan.from_json(args.plan.read_text())
    node = NodeEnvironment(args.node_rank, args.nnodes, args.master_addr, args.master_port)
    try:
        rc = run_node(plan, node)
    except ShippedCodeMissing as e:   # nothing to debug: the sentence says what happened and what to do
        Console(stderr=True, soft_wrap=True).print(f"[node] failed: {e}", markup=False)
        rc = EXIT_FAILED
    except Exception as e:  # reported in one line; the traceback goes to the log for whoever debugs
        log.exception("node runner failed")
        Console(stderr=True).print(f"[node] failed: {e}", markup=False)
        rc = EXIT_FAILED
    if args.exit_file:
        args.exit_file.write_text(str(rc))
    return rc


if __name__ == "__main__":
    sys.exit(main())
