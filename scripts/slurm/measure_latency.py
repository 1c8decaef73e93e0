"""Submit-to-first-step latency of the Slurm backend on the loopback test cluster.

Starts the cluster of tests/integration/slurm_cluster.py, submits the tiny CPU smoke job N times
(shards staged once beforehand, as on a node that ran the job before) and splits each latency into:
sbatch (submit() returns), queue (job seen RUNNING), node runner up to torchrun, torchrun to the
trainer's first step. Prints a table and writes JSON (machine named) for bench/results/.

    .venv/bin/python scripts/slurm/measure_latency.py [--runs 3] [--out bench/results/slurm_latency.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from slurm_cluster import SlurmCluster  # noqa: E402

from orchestrator.backends.slurm import SlurmBackend  # noqa: E402
from orchestrator.cluster_config import load_cluster  # noqa: E402
from orchestrator.config import load_job  # noqa: E402
from orchestrator.plan import build_plan  # noqa: E402

TINY = ["trainer.num_layers=2", "trainer.attn_skip_layers=", "trainer.paired_head_layers=", "trainer.num_value_embeds=1", "trainer.model_dim=64", "trainer.num_heads=1",
        "trainer.bigram_dim=16", "trainer.bigram_rows=50304",   # the default bigram embedding, narrowed
        "trainer.head_dim=64", "trainer.seq_len=256", "trainer.grad_accum_total=1", "trainer.val_seq_len=1024",
        "trainer.val_tokens=4096", "trainer.steps=3", "trainer.val_every=3", "trainer.window_max_blocks=2",
        "checkpoint.final=false"]


def one_run(root: Path, store: Path, tag: str) -> dict:
    sets = [*TINY, "cluster.device=cpu", "cluster.gpus_per_node=1", "cluster.slurm.cpus_per_task=1",
            f"cluster.slurm.log_dir={root / 'submitit'}", f"cluster.work_dir={root / 'work'}",
            f"cluster.data_dir={root / 'data'}"]
    job = load_job(REPO / "jobs" / "smoke.yaml", sets)
    cluster, cpath = load_cluster("slurm", sets)
    plan = build_plan(job, cluster, REPO / "jobs" / "smoke.yaml", cpath, seeds=1, store=str(store))
    backend = SlurmBackend(cluster)
    t0 = time.time()
    handle = backend.submit(plan)
    t_submitted = time.time()
    t_running = None
    while True:
        st = backend.status(handle)
        if t_running is None and st.state.value in ("RUNNING", "SUCCEEDED"):
            t_running = time.time()
        if st.state.finished:
            break
        time.sleep(0.05)
    if st.state.value != "SUCCEEDED":
        raise SystemExit(f"run {tag} did not succeed: {st.detail}")
    tt = json.loads((store / plan.sweep_id / "seed-0" / "trainer_timings.json").read_text())
    t = json.loads((store / plan.sweep_id / "seed-0" / "timings.json").read_text())
    seed_start = tt["first_step_unix"] - t["seed_start_to_first_step_s"]
    return {"sbatch_s": t_submitted - t0, "queue_s": t_running - t0, "node_runner_s": seed_start - t_running,
            "torchrun_to_first_step_s": t["seed_start_to_first_step_s"], "submit_to_first_step_s": tt["first_step_unix"] - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "slurm_latency.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="speedrun-slurm-latency-"))
    cluster = SlurmCluster.start()
    try:
        os.environ["SLURM_CONF"] = str(cluster.conf)
        one_run(root, root / "store", "warm-up")  # stages the shards once, like a node that ran the job before
        runs = [one_run(root, root / "store", str(i)) for i in range(args.runs)]
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    keys = list(runs[0])
    table = Table(title=f"Slurm submit-to-first-step on {socket.gethostname()} ({os.cpu_count()} cores, loadavg "
                        f"{os.getloadavg()[0]:.1f})", title_justify="left")
    table.add_column("phase")
    for i in range(len(runs)):
        table.add_column(f"run {i}", justify="right")
    table.add_column("median", justify="right")
    for k in keys:
        vals = [r[k] for r in runs]
        table.add_row(k, *(f"{v:.2f}" for v in vals), f"{statistics.median(vals):.2f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
                                    "runs": runs, "median": {k: statistics.median(r[k] for r in runs) for k in keys}},
                                   indent=2))
    Console().print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
