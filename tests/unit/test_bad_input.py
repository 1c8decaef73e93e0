"""Issue 23: bad input is one sentence and exit 2, checked before anything is planned or created."""
from __future__ import annotations

import os

import pytest

from orchestrator.cli import main
from orchestrator.sweep import MAX_SEEDS


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1000000000"], f"--seeds 1000000000: must be from 1 to {MAX_SEEDS} (a sweep's bound)"),
    (["--seeds", "0"], f"--seeds 0: must be from 1 to {MAX_SEEDS}"),
    (["--set", "seeds=1000000000"], f"--set seeds=1000000000 (on jobs/smoke.yaml): seeds: must be <= {MAX_SEEDS} (got 1000000000)"),
    (["--set", "seeds=-2"], "--set seeds=-2 (on jobs/smoke.yaml): seeds: must be >= 1 (got -2)"),
])
def test_a_seed_count_out_of_bounds_is_one_sentence_and_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))   # the run index must stay empty: nothing is created
    assert main(["launch", "jobs/smoke.yaml", *argv, "--dry-run", "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert message in err and "must be must be" not in err and err.count("\n") == 1
    assert not (tmp_path / "store").exists()


def test_seeds_given_twice_is_refused_not_silently_picked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = ["launch", "jobs/smoke.yaml", "--seeds", "3", "--set", "seeds=5", "--dry-run", "--store", str(tmp_path / "s")]
    assert main(argv) == 2
    assert "--seeds 3 and --set seeds=5: two seed counts; give one of them" in capsys.readouterr().err


def test_collect_of_a_run_that_is_nowhere_is_bad_input(tmp_path, monkeypatch, capsys):
    """No spool and no such sweep in the store: one sentence and exit 2, not 'nothing to collect' and 0."""
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = ["collect", "smoke-20990101T000000Z-000000", "--store", str(tmp_path / "store"), "--spool", str(tmp_path / "x")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "collect smoke-20990101T000000Z-000000: no spool at" in err and "no such sweep in" in err


def launch(tmp_path, *argv):
    return main(["launch", *map(str, argv), "--dry-run", "--store", str(tmp_path / "store")])


def one_sentence(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_seeds_that_are_not_a_whole_number_are_one_sentence_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        launch(tmp_path, "jobs/smoke.yaml", "--seeds", "1e23")
    assert e.value.code == 2
    assert one_sentence(capsys) == ("speedrun launch: error: argument --seeds: 1e23 is not a whole number; give a seed "
                                    f"count from 1 to {MAX_SEEDS}; see speedrun launch --help\n")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("as_cluster", [False, True])
def test_a_binary_job_or_cluster_file_is_one_sentence(as_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    binary = tmp_path / "x.yaml"
    binary.write_bytes(b"name: x\n\xff\xfe\x00\x01")   # \xff never occurs in UTF-8
    argv = ["jobs/smoke.yaml", "--cluster", binary] if as_cluster else [binary]
    assert launch(tmp_path, *argv) == 2
    assert f"error: {binary}: not a text file (byte 8 is not UTF-8); give the " in one_sentence(capsys)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("as_cluster", [False, True])
def test_an_unreadable_job_or_cluster_file_is_one_sentence(as_cluster, tmp_path, monkeypatch, capsys):
    """/proc/self/mem is a file that read() refuses (EIO) even for root, who reads past chmod 000."""
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = ["jobs/smoke.yaml", "--cluster", "/proc/self/mem"] if as_cluster else ["/proc/self/mem"]
    assert launch(tmp_path, *argv) == 2
    assert one_sentence(capsys) == ("error: /proc/self/mem: cannot be read (Input/output error); "
                                    "check that it is a readable file\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file; the /proc/self/mem case covers root")
def test_a_job_file_without_read_permission_is_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    job = tmp_path / "job.yaml"
    job.write_text("name: x\n")
    job.chmod(0)
    assert launch(tmp_path, job) == 2
    assert f"error: {job}: cannot be read (Permission denied)" in one_sentence(capsys)


def test_a_directory_in_place_of_a_job_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "job.yaml").mkdir()
    assert launch(tmp_path, tmp_path / "job.yaml") == 2
    assert f"{tmp_path / 'job.yaml'}: is a directory, not a job file" in one_sentence(capsys)


def test_an_unreadable_log_file_is_one_sentence(tmp_path, capsys):
    assert main(["stats", "/proc/self/mem"]) == 2
    assert one_sentence(capsys) == "error: log file /proc/self/mem: cannot be read (Input/output error); " \
                                   "check that it is a readable file\n"
    logs = tmp_path / "logs"
    (logs / "a.txt").mkdir(parents=True)   # a folder's *.txt that is itself a folder
    assert main(["stats", str(logs)]) == 2
    assert f"log file {logs / 'a.txt'} does not exist or is not a file" in one_sentence(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file; the /proc/self/mem case covers root")
def test_a_log_file_without_read_permission_is_one_sentence(tmp_path, capsys):
    log = tmp_path / "run.txt"
    log.write_text("step:1/1 val_loss:3.2 train_time:1ms step_avg:1.00ms\n")
    log.chmod(0)
    assert main(["stats", str(log)]) == 2
    assert f"log file {log}: cannot be read (Permission denied)" in one_sentence(capsys)


@pytest.mark.parametrize("override, message", [
    ("ray.address=http://x:8265", "--set ray.address=http://x:8265: ray is a cluster key, not a job key; "
                                  "write --set cluster.ray.address=http://x:8265"),
    ("nodes=2", "--set nodes=2: nodes is a cluster key, not a job key; write --set cluster.nodes=2"),
    ("sedes=2", "--set sedes=2: sedes is neither a job key nor cluster.<key>; did you mean 'seeds'?"),
    ("data.sorce=x", "--set data.sorce=x (on jobs/smoke.yaml): data.sorce: unknown key; did you mean 'source'?"),
    ("trainer.stepz=5", "--set trainer.stepz=5 (on jobs/smoke.yaml): trainer.stepz: unknown key; did you mean 'steps'?"),
    ("cluster.gpus_per_node=0", "--set cluster.gpus_per_node=0 (on "),
])
def test_a_bad_set_blames_the_set_and_names_the_fix(override, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert launch(tmp_path, "jobs/smoke.yaml", "--set", override) == 2
    assert f"error: {message}" in one_sentence(capsys)
    assert not (tmp_path / "store").exists()


def test_the_fix_a_bad_set_names_is_accepted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert launch(tmp_path, "jobs/smoke.yaml", "--cluster", "ray", "--set", "cluster.ray.address=http://x:8265") == 0
    assert "http://x:8265" in capsys.readouterr().out


@pytest.mark.parametrize("cluster, message", [
    ("local", "cluster_configs/local.yaml): nodes: the local backend runs on this one machine, so nodes must be 1 "
              "(got 2); use a slurm or ray cluster config for more nodes"),
    ("ray-cluster-aws", "cluster_configs/ray-cluster-aws.yaml): nodes: 2 nodes of 8 GPUs asked for, but ray.launcher "
                        "starts 1 such node(s); raise min_workers or lower nodes"),
])
def test_two_nodes_on_a_cluster_without_workers_is_refused_at_dry_run(cluster, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert launch(tmp_path, "jobs/smoke.yaml", "--cluster", cluster, "--set", "cluster.nodes=2") == 2
    err = one_sentence(capsys)
    assert err.startswith("error: --set cluster.nodes=2 (on ") and message in err
    assert not (tmp_path / "store").exists() and not (tmp_path / ".cache").exists()
