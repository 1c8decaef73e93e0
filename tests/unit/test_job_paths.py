"""Issue 26: every path of a job file is read from the job file's folder, once, in config; and what a launch
can check before its first side effect is checked at --dry-run (one sentence, exit 2, nothing created)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import ConfigError, load_job
from orchestrator.plan import LaunchPlan

REPO = Path(__file__).resolve().parents[2]
FAKE_RECORD = REPO / "tests" / "data" / "fake_record"
SYNTHETIC = "synthetic://markov?seed=0&train_shards=1&shard_tokens=4096"


def job_file(folder: Path, **spec) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"name": "mine", "data": {"source": SYNTHETIC, "train_shards": 1}, **spec}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def record(tmp_path: Path) -> Path:
    dest = tmp_path / "my-record"
    dest.mkdir()
    for p in FAKE_RECORD.iterdir():
        if p.is_file():
            (dest / p.name).write_bytes(p.read_bytes())
    return dest


def test_workdir_and_script_resolve_against_the_job_file_not_the_cwd(tmp_path, monkeypatch):
    record(tmp_path)
    path = job_file(tmp_path / "jobs", workdir="../my-record", script="train_gpt.py",
                    data={"source": "../shards", "train_shards": 1, "dir": "staged"},
                    offline={"tiktoken": ["gpt2"], "cache": "offline-cache"})
    monkeypatch.chdir(REPO)   # launched from elsewhere
    job = load_job(path)
    assert job.workdir == str(tmp_path / "my-record") and job.script == "train_gpt.py"
    assert job.data.source == str(tmp_path / "shards") and job.data.dir == str(tmp_path / "jobs" / "staged")
    assert job.offline.cache == str(tmp_path / "jobs" / "offline-cache")


def test_the_trainers_vocab_file_resolves_against_the_job_file_and_must_exist(tmp_path, monkeypatch):
    (tmp_path / "bpe").mkdir()
    path = job_file(tmp_path / "jobs", trainer={"prefix_token_loss": True, "vocab_file": "../bpe"})
    monkeypatch.chdir(REPO)
    assert load_job(path).trainer["vocab_file"] == str(tmp_path / "bpe")
    missing = job_file(tmp_path / "jobs2", trainer={"prefix_token_loss": True, "vocab_file": "bpe"})
    with pytest.raises(ConfigError, match=r"^.*jobs2/job.yaml: trainer.vocab_file: .*/jobs2/bpe does not exist; "):
        load_job(missing)


def test_script_alone_resolves_against_the_job_file(tmp_path, monkeypatch):
    record(tmp_path)
    path = job_file(tmp_path / "jobs", script="../my-record/train_gpt.py")
    monkeypatch.chdir(tmp_path / "my-record")   # the same relative path from here names nothing
    assert load_job(path).script == str(tmp_path / "my-record" / "train_gpt.py")
    monkeypatch.chdir(tmp_path)
    relative_to_cwd = job_file(tmp_path / "jobs2", script="my-record/train_gpt.py")   # right from the cwd only
    with pytest.raises(ConfigError, match=r"script: .*/jobs2/my-record/train_gpt.py does not exist; .*job file's folder"):
        load_job(relative_to_cwd)


@pytest.mark.parametrize("spec, message", [
    ({"workdir": "../my-record"}, "workdir: needs script: the entry script inside it"),
    ({"workdir": "../nowhere", "script": "train_gpt.py"}, "workdir: {tmp}/nowhere is not a folder"),
    ({"workdir": "../my-record", "script": "../jobs/job.yaml"}, "script: ../jobs/job.yaml is not inside workdir {tmp}/my-record"),
    ({"workdir": "../my-record", "script": "train.py"}, "script: {tmp}/my-record/train.py does not exist"),
    ({"script_dirs": ["../outside"]}, "script_dirs: '../outside' must be a folder inside the script's working directory"),
    ({"offline": {"hf_kernels": ["flash-attn3"]}}, "offline.hf_kernels: 'flash-attn3' is not a hub repo id"),
])
def test_bad_workdir_keys_are_one_sentence(tmp_path, spec, message):
    record(tmp_path)
    path = job_file(tmp_path / "jobs", **spec)
    with pytest.raises(ConfigError) as e:
        load_job(path)
    assert message.format(tmp=tmp_path) in str(e.value) and str(e.value).startswith(str(path))


def dry_run(tmp_path: Path, path: Path, *extra: str) -> int:
    return main(["launch", str(path), "--dry-run", "--store", str(tmp_path / "store"),
                 "--set", f"cluster.data_dir={tmp_path / 'data'}", "--set", f"cluster.work_dir={tmp_path / 'work'}",
                 *extra])


def created(tmp_path: Path) -> list[str]:
    return [p for p in ("store", "data", "work", "home") if (tmp_path / p).exists()]


@pytest.mark.parametrize("case, message", [
    ("shards", "data: synthetic://markov?seed=0&train_shards=1&shard_tokens=4096 does not provide "
               "fineweb_train_000002.bin, fineweb_train_000003.bin; raise train_shards/val_shards in the synthetic:// URL"),
    ("no-script", "script: {tmp}/my-record/train.py does not exist"),
    ("no-folder", "data.source: {tmp}/shards is not a folder on this machine"),
    ("few-files", "data: {tmp}/shards does not provide fineweb_val_000000.bin; add the shards to the folder"),
    ("too-large", "workdir: {tmp}/my-record ships 2.0 MB (largest: weights.npy, 2.0 MB), more than workdir_max_mb: 1;"),
    ("unreadable", "workdir: {tmp}/my-record/old.py is a broken link; fix it or add it to {tmp}/my-record/.gitignore"),
    ("offline", "offline: the hub repo kernels-community/flash-attn3 is not in {tmp}/jobs/cache; pre-fetch on a machine "
                "with internet with `speedrun prefetch {tmp}/jobs/job.yaml`"),
])
def test_dry_run_checks_everything_before_any_side_effect(case, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    rec = record(tmp_path)
    spec = {"workdir": "../my-record", "script": "train_gpt.py"}
    if case == "shards":
        spec["data"] = {"source": SYNTHETIC, "train_shards": 3}
    elif case in ("no-folder", "few-files"):
        spec["data"] = {"source": "../shards", "train_shards": 1}
        if case == "few-files":
            (tmp_path / "shards").mkdir()
            (tmp_path / "shards" / "fineweb_train_000001.bin").write_bytes(b"")
    elif case == "no-script":
        spec["script"] = "train.py"
    elif case == "too-large":
        spec["workdir_max_mb"] = 1
        (rec / "weights.npy").write_bytes(b"\0" * 2_000_000)
    elif case == "unreadable":
        os.symlink("/nonexistent/old.py", rec / "old.py")
    elif case == "offline":
        spec["offline"] = {"hf_kernels": ["kernels-community/flash-attn3"], "cache": "cache"}
    path = job_file(tmp_path / "jobs", **spec)
    assert dry_run(tmp_path, path) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and err.count("\n") == 1, err
    assert created(tmp_path) == []


def test_dry_run_of_a_good_workdir_shows_what_ships_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    record(tmp_path)
    path = job_file(tmp_path / "jobs", workdir="../my-record", script="train_gpt.py")
    assert dry_run(tmp_path, path, "--set", "cluster.gpus_per_node=1") == 0
    out = capsys.readouterr().out
    assert f"{tmp_path}/my-record: 2 files" in out and "/workdirs/" in out and "nothing was created" in out
    assert created(tmp_path) == []


def test_the_plan_carries_the_shipped_folder(tmp_path):
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.plan import build_plan

    record(tmp_path)
    path = job_file(tmp_path / "jobs", workdir="../my-record", script="train_gpt.py")
    plan = build_plan(load_job(path), ClusterConfig(name="c", backend="local"), path, Path("c.yaml"))
    again = LaunchPlan.from_json(plan.to_json())
    assert again.workdir["entry"] == "train_gpt.py" and again.workdir["files"] == 2
    assert again.workdir["key"] == f"workdirs/{again.workdir['sha256']}.tar"
    assert json.loads(plan.to_json())["offline"] == {}


def test_launch_ships_what_was_planned_or_says_the_folder_changed(tmp_path):
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.plan import build_plan
    from orchestrator.store import open_store
    from orchestrator.workdir import ship_code

    rec = record(tmp_path)
    path = job_file(tmp_path / "jobs", workdir="../my-record", script="train_gpt.py")
    plan = build_plan(load_job(path), ClusterConfig(name="c", backend="local"), path, Path("c.yaml"))
    store = open_store(tmp_path / "store")
    ship_code(plan, store)
    assert [o.key for o in store.list("")] == [plan.workdir["key"], plan.workdir["key"] + ".used"]   # and its stamp
    (rec / "fake_kernels.py").write_text("VOCAB = 1\n")   # edited between the plan and the upload
    with pytest.raises(ConfigError, match=rf"^{path}: {rec} changed since the plan was made; launch again$"):
        ship_code(plan, store)


def test_a_script_and_our_trainer_keep_their_compile_caches_apart_on_the_node(tmp_path):
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.node import NodeRunner
    from orchestrator.plan import build_plan

    record(tmp_path)
    cluster = ClusterConfig(name="c", backend="local", device="cpu", work_dir=str(tmp_path / "work"))
    script_job = job_file(tmp_path / "a", workdir="../my-record", script="train_gpt.py")
    ours_job = job_file(tmp_path / "b")
    script = NodeRunner(build_plan(load_job(script_job), cluster, script_job, Path("c.yaml")))
    ours = NodeRunner(build_plan(load_job(ours_job), cluster, ours_job, Path("c.yaml")))
    sha = script.plan.workdir["sha256"]
    assert script.caches.compile_cache_key.startswith(f"compile-cache/script-{sha[:16]}-")
    assert not ours.caches.compile_cache_key.startswith("compile-cache/script-")
    assert script.caches.cache_root.parent == ours.caches.cache_root.parent == tmp_path / "work" / "compile-cache"
    assert script.caches.cache_root != ours.caches.cache_root
    env = script.child_env(0)
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(script.caches.cache_root / "inductor")
    assert env["DATA_PATH"] == str(script.work / "seed-0" / "script")


def test_the_nodes_compile_cache_folder_wins_over_a_cache_dir_in_its_own_environment(tmp_path, monkeypatch):
    """torch sets TORCHINDUCTOR_CACHE_DIR in its process's environment once it has compiled; a node runner started
    from such a process must still point its seeds at the cache it restores and saves."""
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.node import NodeRunner
    from orchestrator.plan import build_plan

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_elsewhere")
    cluster = ClusterConfig(name="c", backend="local", device="cpu", work_dir=str(tmp_path / "work"))
    job = job_file(tmp_path / "b")
    runner = NodeRunner(build_plan(load_job(job), cluster, job, Path("c.yaml")))
    assert runner.child_env(0)["TORCHINDUCTOR_CACHE_DIR"] == str(runner.caches.cache_root / "inductor")
    chosen = ClusterConfig(name="c", backend="local", device="cpu", work_dir=str(tmp_path / "work"),
                           env={"TORCHINDUCTOR_CACHE_DIR": "/fast/disk"})
    runner = NodeRunner(build_plan(load_job(job), chosen, job, Path("c.yaml")))
    assert runner.child_env(0)["TORCHINDUCTOR_CACHE_DIR"] == "/fast/disk"   # a cluster config's choice stays


def test_every_seed_compiles_with_the_ptxas_torch_ships(tmp_path, monkeypatch):
    """Triton keys its cache on ptxas's version and inductor picks torch's ptxas only when it compiles itself: the
    seeds get it from the start, so a warm process finds the kernels a cold one compiled; a config's choice stays."""
    import orchestrator.node as node
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.compile_cache import ptxas_env
    from orchestrator.node import NodeRunner
    from orchestrator.plan import build_plan

    ptxas = tmp_path / "torch" / "bin" / "ptxas"
    ptxas.parent.mkdir(parents=True)
    ptxas.write_text("#!/bin/sh\n")
    ptxas.chmod(0o755)
    monkeypatch.delenv("TRITON_PTXAS_PATH", raising=False)
    monkeypatch.setattr(node, "ptxas_env", lambda environ: ptxas_env(environ, tmp_path / "torch"))
    job = job_file(tmp_path / "b")
    cluster = ClusterConfig(name="c", backend="local", device="cpu", work_dir=str(tmp_path / "work"))
    assert NodeRunner(build_plan(load_job(job), cluster, job, Path("c.yaml"))).child_env(0)["TRITON_PTXAS_PATH"] \
        == str(ptxas)
    chosen = ClusterConfig(name="c", backend="local", device="cpu", work_dir=str(tmp_path / "work"),
                           env={"TRITON_PTXAS_PATH": "/opt/cuda/bin/ptxas"})
    assert NodeRunner(build_plan(load_job(job), chosen, job, Path("c.yaml"))).child_env(0)["TRITON_PTXAS_PATH"] \
        == "/opt/cuda/bin/ptxas"


def test_our_trainer_gets_the_offline_tiktoken_cache_too(tmp_path, offline_cache):
    """The prefix-token loss reads the GPT-2 vocabulary through tiktoken: an offline node's shipped cache serves our
    trainer as it serves a record script."""
    from orchestrator.cluster_config import ClusterConfig
    from orchestrator.node import NodeRunner
    from orchestrator.plan import build_plan

    cluster = ClusterConfig(name="c", backend="local", device="cpu", work_dir=str(tmp_path / "work"))
    job = job_file(tmp_path / "b", trainer={"prefix_token_loss": True},
                   offline={"tiktoken": ["gpt2"], "cache": str(offline_cache)})
    runner = NodeRunner(build_plan(load_job(job), cluster, job, Path("c.yaml")))
    assert "TIKTOKEN_CACHE_DIR" not in runner.child_env(0)   # nothing unpacked yet
    runner.caches.offline_dir = tmp_path / "work" / "shipped" / "offline-0123"
    env = runner.child_env(0)
    assert env["TIKTOKEN_CACHE_DIR"] == str(runner.caches.offline_dir / "tiktoken") and "DATA_PATH" not in env
