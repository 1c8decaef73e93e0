"""orchestrator/sweep.py: a sweep's rules as pure functions (keys, seed states, exit codes, the retry policy)."""
from __future__ import annotations

import ast
from pathlib import Path

from orchestrator import sweep
from orchestrator.sweep import Ending, SeedState, ending_of_exit, ending_of_nodes, next_action

REPO = Path(__file__).resolve().parents[2]


def test_seed_keys_and_layout():
    assert sweep.seed_prefix("s-1", 3) == "s-1/seed-3"
    assert sweep.seed_of_dir("seed-12") == 12 and sweep.seed_of_dir("seed-x") is None
    assert sweep.seed_of_dir(sweep.seed_dir(7)) == 7
    assert sweep.plan_key("s") == "s/plan.json" and sweep.handle_key("s") == "s/handle.json"
    assert sweep.attempt_key("s", "12_0") == "s/attempts/12_0.json"
    assert sweep.sweep_of_key("s/plan.json") == "s" and sweep.sweep_of_key("s/seed-0/plan.json") is None


def test_a_seed_is_done_only_with_a_manifest_that_says_succeeded():
    assert sweep.seed_done(True, "succeeded") and sweep.seed_done(True, None)  # manifests before the field
    assert not sweep.seed_done(True, "failed") and not sweep.seed_done(False, "succeeded")
    assert sweep.seed_state(False, None) is SeedState.INCOMPLETE
    assert sweep.seed_state(True, "failed") is SeedState.FAILED


def test_exit_codes_are_the_trainers():
    from trainer.train import PREEMPTED_EXIT

    assert sweep.EXIT_PREEMPTED == PREEMPTED_EXIT == 75
    assert sweep.trainer_outcome(0) is SeedState.SUCCEEDED
    assert sweep.trainer_outcome(75) is SeedState.PREEMPTED and sweep.trainer_outcome(1, stop_requested=True) is SeedState.PREEMPTED
    assert sweep.trainer_outcome(-9) is SeedState.FAILED
    assert sweep.describe_exit(-9) == "killed by SIGKILL" and sweep.describe_exit(3) == "exit code 3"


def test_endings_of_node_runners():
    assert [ending_of_exit(c) for c in (0, 75, 1, -9, "lost")] == [
        Ending.SUCCEEDED, Ending.PREEMPTED, Ending.FAILED, Ending.DIED, Ending.DIED]
    assert ending_of_nodes({0: 0, 1: 75}) is Ending.PREEMPTED
    assert ending_of_nodes({0: 1, 1: 75}) is Ending.DIED  # mixed: the nodes disagree, run it again


def test_the_retry_policy():
    assert next_action(Ending.DIED, [0], 0, 1).action == "retry"
    assert next_action(Ending.DIED, [0], 1, 1).action == "failed"
    assert next_action(Ending.DIED, [], 0, 1).action == "done"  # every seed has its manifest
    assert next_action(Ending.FAILED, [0], 0, 3).action == "failed"  # the node runner spent them already
    assert next_action(Ending.PREEMPTED, [0], 1, 1, requeues=3).action == "resume"  # spends no retry
    assert next_action(Ending.PREEMPTED, [0], 1, 1, requeues=sweep.MAX_REQUEUES).action == "failed"
    # a failed query is never grounds to submit anything
    unknown = next_action(Ending.UNKNOWN, [0], 0, 5, why="squeue exited with 1")
    assert unknown.action == "wait" and "squeue exited with 1" in unknown.reason


def test_the_sweep_rules_import_nothing_from_the_orchestrator():
    def imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert not any(m.startswith("orchestrator") for m in imports(REPO / "orchestrator" / "sweep.py"))


def test_the_trainer_imports_nothing_from_the_orchestrator():
    for path in (REPO / "trainer").rglob("*.py"):
        tree = ast.parse(path.read_text())
        found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m.split(".")[0] == "orchestrator" for m in found), path


def test_the_shard_format_has_one_implementation():
    from orchestrator.data import shards
    from trainer import data, shard_format

    assert shards.MAGIC is shard_format.MAGIC and shards.encode_header is shard_format.encode_header
    assert data.read_header is shard_format.read_header and data.write_shard is shard_format.write_shard
    for path in (REPO / "orchestrator" / "data" / "shards.py", REPO / "trainer" / "data.py"):
        assert "MAGIC =" not in path.read_text() and "np.zeros(HEADER_INTS" not in path.read_text(), path



def test_the_state_a_sweeps_table_shows(tmp_path):
    from orchestrator.results import load_sweep
    from orchestrator.store import LocalStore
    from orchestrator.summary import sweep_summary

    assert sweep.shown_state(True, True) is SeedState.SUCCEEDED
    assert sweep.shown_state(False, True) is SeedState.FAILED and sweep.shown_state(False, False) is SeedState.INCOMPLETE
    store = LocalStore(tmp_path)
    line = b"step:10/10 val_loss:3.2700 train_time:1000ms step_avg:100.00ms\n"
    for seed in (0, 1):
        store.put_bytes(line, f"{sweep.seed_prefix('s', seed)}/train.log")
    store.put_bytes(b'{"prefix": "s/seed-0", "files": [], "created_at": 0, "format": 1}', "s/seed-0/manifest.json")
    assert [(r.seed, r.state) for r in load_sweep(store, "s")] == [(0, "succeeded"), (1, "incomplete")]
    assert [(r.seed, r.state) for r in sweep_summary(store, "s").seeds] == [(0, "succeeded"), (1, "incomplete")]


def test_a_seeds_timings_take_the_trainers_first_step_else_the_one_the_node_runner_saw():
    run = dict(started_unix=1000.0, first_step_unix=1040.0, ended_unix=1300.0)
    ours = sweep.seed_timings(900.0, dict(first_step_unix=1030.0, warmup_s=25.0, train_s=200.0, val_s=12.0,
                                          steps_done=10, total_steps=10, warmup_parts={"first_step_s": 6.0}),
                              run, 3.5, 1310.0, state="succeeded", reason="", exit_code=0, attempts=1)
    assert (ours["launch_to_first_step_s"], ours["seed_start_to_first_step_s"]) == (130.0, 30.0)
    assert (ours["warmup_s"], ours["train_s"], ours["validation_s"], ours["warmup_parts_s"]) == (
        25.0, 200.0, 12.0, {"first_step_s": 6.0})
    assert (ours["upload_s"], ours["total_s"], ours["seed_wall_s"], ours["reason"]) == (3.5, 410.0, 300.0, None)
    record = sweep.seed_timings(900.0, {}, run, 1.0, 1310.0, state="failed", reason="trainer exited with code 1",
                                exit_code=1, attempts=2)
    assert (record["launch_to_first_step_s"], record["seed_start_to_first_step_s"], record["warmup_s"]) == (
        140.0, 40.0, None)
    assert (record["state"], record["reason"], record["exit_code"], record["attempts"]) == (
        "failed", "trainer exited with code 1", 1, 2)
    died = sweep.seed_timings(900.0, {}, dict(run, first_step_unix=None), 0.0, 1310.0, state="failed", reason="x",
                              exit_code=1, attempts=1)
    assert died["launch_to_first_step_s"] is None and died["seed_start_to_first_step_s"] is None
