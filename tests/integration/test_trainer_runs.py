"""The trainer end to end on CPU: ranks, Muon sharding, resume, preemption, and learning a Markov chain."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from orchestrator.data.synthetic import markov_shards  # noqa: E402
from trainer.fixtures import tiny_config  # noqa: E402
from trainer.train import PREEMPTED_EXIT, Trainer  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("torch_one_thread")]
REPO = Path(__file__).resolve().parents[2]




@pytest.fixture(scope="module")
def markov(tmp_path_factory):
    d = tmp_path_factory.mktemp("markov")
    return d, markov_shards(d)


def rows(out, key):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def torchrun(nproc, data, out, cfg, *extra, env=None, program=("-m", "trainer")):
    """`program` (the trainer, or a script taking its --data-dir, --out-dir and --config) on nproc gloo ranks."""
    (out / "cfg.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *program,
           "--data-dir", str(data), "--out-dir", str(out), "--config", str(out / "cfg.json"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def test_two_gloo_ranks_train_the_same_model_as_one(markov, tmp_path):
    data, _ = markov
    cfg = tiny_config(steps=3, val_every=3)
    Trainer(cfg, str(data), str(tmp_path / "one")).run()
    done = torchrun(2, data, tmp_path / "two", cfg)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = rows(tmp_path / "one", "train_loss"), rows(tmp_path / "two", "train_loss")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for s in one:   # same tokens, same updates; only the order of float sums differs
        assert two[s] == pytest.approx(one[s], abs=2e-3)
    assert "step:3/3 val_loss:" in done.stdout and "peak memory allocated:" in done.stdout
    # a step's line is written once the next step is queued: still one per step, in order, before the
    # validation of the last step, with train_time growing
    lines = [ln.split()[0] + " " + ln.split()[1].split(":")[0] for ln in done.stdout.splitlines() if ln.startswith("step:")]
    assert lines == ["step:0/3 val_loss", "step:1/3 train_loss", "step:2/3 train_loss", "step:3/3 train_loss",
                     "step:3/3 val_loss"]
    times = rows(tmp_path / "two", "train_time_ms")
    assert [times[s] for s in sorted(times)] == sorted(times.values())
    # every parameter equals the one-rank run's: a gradient the reducer missed shows here, not in 3 steps' losses
    a = torch.load(tmp_path / "one" / "ckpt" / "final.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "two" / "ckpt" / "final.pt", weights_only=False)["model"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-3, msg=name)   # Muon's bf16: ~5e-4


OWNED_GRADS_RUN = """
import argparse, json, sys
import torch.distributed as dist
from trainer.config import TrainConfig
from trainer.cuda_graphs import OwnedGradients
from trainer.train import Trainer

ap = argparse.ArgumentParser()
for flag in ("--data-dir", "--out-dir", "--config"):
    ap.add_argument(flag)
args = ap.parse_args()
trainer = Trainer(TrainConfig.from_dict(json.loads(open(args.config).read())), args.data_dir, args.out_dir)
trainer.owned_grads = OwnedGradients(trainer.model.parameters())   # as cuda_graphs sets it up on a GPU
code = trainer.run()
dist.destroy_process_group()
sys.exit(code)
"""


def test_two_gloo_ranks_with_cuda_graphs_gradient_bookkeeping_train_the_same_model_as_without(markov, tmp_path):
    """cuda_graphs (on by default) gives every parameter a zeroed .grad of its own before a step's first backward
    and sets the unreached ones back to None after its last; with the reducer's all-reduce on 2 ranks, and Adam's
    gradients left to add up over two steps, the model must be bit for bit the one of the same 2 ranks without it.
    (CPU runs never compile, so never replay graphs: this is the bookkeeping the 8 GPUs run, not the graphs.)"""
    data, _ = markov
    cfg = tiny_config(steps=4, val_every=4, grad_accum_total=4, adam_every_other_step=True)
    plain = torchrun(2, data, tmp_path / "plain", cfg)
    assert plain.returncode == 0, plain.stderr[-3000:]
    (tmp_path / "run.py").write_text(OWNED_GRADS_RUN)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))   # a script: no -m, no cwd
    done = torchrun(2, data, tmp_path / "owned", cfg, env={"PYTHONPATH": path}, program=(str(tmp_path / "run.py"),))
    assert done.returncode == 0, done.stderr[-3000:]
    assert rows(tmp_path / "owned", "train_loss") == rows(tmp_path / "plain", "train_loss")
    a = torch.load(tmp_path / "plain" / "ckpt" / "final.pt", weights_only=False)
    b = torch.load(tmp_path / "owned" / "ckpt" / "final.pt", weights_only=False)
    for name in a["model"]:
        assert torch.equal(b["model"][name], a["model"][name]), name


def test_two_gloo_ranks_with_a_batch_schedule_train_the_same_model_as_one(markov, tmp_path):
    """record-46's batch_schedule: phases of 2 and 4 micro-batches, split over 2 ranks, train on the same tokens to
    the same model as one rank taking them all (the gradient's scale: test_trainer_batch_schedule.py)."""
    data, _ = markov
    cfg = tiny_config(steps=4, val_every=4, grad_accum_total=4, batch_schedule="1/2:2,1:4")
    Trainer(cfg, str(data), str(tmp_path / "one")).run()
    done = torchrun(2, data, tmp_path / "two", cfg)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = rows(tmp_path / "one", "train_loss"), rows(tmp_path / "two", "train_loss")
    assert rows(tmp_path / "two", "micro_batches") == {1: 2, 2: 2, 3: 4, 4: 4}
    for s in one:
        assert two[s] == pytest.approx(one[s], abs=2e-3)
    a = torch.load(tmp_path / "one" / "ckpt" / "final.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "two" / "ckpt" / "final.pt", weights_only=False)["model"]
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-3, msg=name)


def test_resume_reproduces_the_uninterrupted_losses(markov, tmp_path):
    data, _ = markov
    cfg = tiny_config(steps=6, val_every=3, checkpoint_every=3)
    Trainer(cfg, str(data), str(tmp_path / "a")).run()
    (tmp_path / "b" / "ckpt").mkdir(parents=True)
    (tmp_path / "a" / "ckpt" / "step_000003.pt").rename(tmp_path / "b" / "ckpt" / "step_000003.pt")
    Trainer(cfg, str(data), str(tmp_path / "b")).run(resume="auto")
    a, b = rows(tmp_path / "a", "train_loss"), rows(tmp_path / "b", "train_loss")
    assert sorted(b) == [4, 5, 6]
    for s in b:
        assert b[s] == pytest.approx(a[s], rel=1e-6)
    assert rows(tmp_path / "b", "val_loss")[6] == pytest.approx(rows(tmp_path / "a", "val_loss")[6], rel=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(data, out, cfg, *extra):
    """Both ranks as torchrun would start them (torchrun itself turns any non-zero exit into 1)."""
    (out / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    port = str(free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "trainer", "--data-dir", str(data), "--out-dir", str(out), "--config", str(out / "cfg.json"),
         *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(r), "LOCAL_RANK": str(r),
             "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}) for r in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    return [p.returncode for p in procs], outs[0][0], outs[0][1] + outs[1][1]


def test_checkpoint_now_exits_75_then_resume_finishes(markov, tmp_path):
    data, _ = markov
    out = tmp_path / "run"
    cfg = tiny_config(steps=6, val_every=3, stop_check_every=2)
    out.mkdir()
    (out / "CHECKPOINT_NOW").touch()
    codes, stdout, stderr = two_ranks(data, out, cfg)
    assert codes == [PREEMPTED_EXIT, PREEMPTED_EXIT], stderr[-3000:]
    assert (out / "ckpt" / "step_000002.pt").is_file() and not (out / "CHECKPOINT_NOW").exists()
    assert json.loads((out / "trainer_timings.json").read_text())["steps_done"] == 2
    codes, stdout, stderr = two_ranks(data, out, cfg, "--resume", "auto")
    assert codes == [0, 0], stderr[-3000:]
    assert "step:3/6" in stdout and "step:1/6" not in stdout
    assert (out / "ckpt" / "final.pt").is_file()
    assert sorted(rows(out, "train_loss")) == [1, 2, 3, 4, 5, 6]
    timings = json.loads((out / "trainer_timings.json").read_text())
    assert timings["steps_done"] == timings["total_steps"] == 6


def test_small_model_reaches_the_markov_entropy_rate(markov, tmp_path):
    data, entropy = markov
    cfg = tiny_config(steps=60, val_every=60, seq_len=1024, val_tokens=8192, adam_head_lr=0.02, adam_embed_lr=0.6,
                      log_every=20)
    Trainer(cfg, str(data), str(tmp_path)).run()
    final = rows(tmp_path, "val_loss")[60]
    assert entropy <= final + 0.02          # no model beats the source (small slack: a finite val sample)
    assert final < entropy + 0.1, f"val loss {final:.3f} vs entropy rate {entropy:.3f}"


def test_sigusr1_checkpoints_and_returns_75(markov, tmp_path):
    data, _ = markov
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        trainer = Trainer(tiny_config(steps=6, val_every=6, stop_check_every=2), str(data), str(tmp_path))
        os.kill(os.getpid(), signal.SIGUSR1)     # as Slurm's --signal would, before the time limit
        assert trainer.run() == PREEMPTED_EXIT
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert (tmp_path / "ckpt" / "step_000002.pt").is_file() and not (tmp_path / "ckpt" / "final.pt").exists()
