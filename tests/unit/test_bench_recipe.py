"""bench/recipe.py's pure parts: the reference script's patch, time to a loss, curves from both trainers' logs,
the data fingerprint and token budget, the override checks, the JSON; and its refusals, end to end."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from recipe import (TOKENS_PER_STEP, UsageError, assemble, check_reference_json, check_token_budget,  # noqa: E402
                    curve_of, data_fingerprint, describe_data, next_run_fits, parse_overrides, parse_variant,
                    patch_reference, plan_runs, results_path, run_tokens, time_to_loss, write_job)

from orchestrator.train_log import parse_log  # noqa: E402
from trainer.data import write_shard  # noqa: E402

# The published record's Hyperparameters lines (record-28), with the code around them that reads them.
SCRIPT = """import uuid
class Hyperparameters:
    # data
    dampen_factor = 64
    run_id = f'final/{uuid.uuid4()}'
    train_files = "data/fineweb10B/fineweb_train_*.bin" # input .bin to train on
    val_tokens = 10485760 # how many tokens of validation data? it's important to keep this fixed for consistent comparisons
    train_seq_len = 48*1024 # FlexAttention sequence length
    # optimization
    num_iterations = 1695 # number of iterations to run
    cooldown_frac = 0.45 # fraction of training spent cooling down the learning rate
    # evaluation and logging
    val_loss_every = 125 # every how many steps to evaluate val loss? 0 for only at the end
    save_checkpoint = False
args = Hyperparameters()
val_steps = args.val_tokens // (4*64*1024)
train_steps = args.num_iterations
logfile = f"logs/{args.run_id}.txt"
"""


def test_patch_reference_sets_the_three_constants_and_nothing_else():
    out = patch_reference(SCRIPT, steps=110, val_every=22, val_tokens=4194304)
    expected = (SCRIPT.replace("val_tokens = 10485760 #", "val_tokens = 4194304 #")
                .replace("num_iterations = 1695 #", "num_iterations = 110 #")
                .replace("val_loss_every = 125 #", "val_loss_every = 22 #"))
    assert out == expected
    ns: dict = {}
    exec(out, ns)
    args = ns["args"]
    assert (args.num_iterations, args.val_loss_every, args.val_tokens) == (110, 22, 4194304)
    assert args.run_id.startswith("final/")   # logs/final/<uuid>.txt, in the folder the job's script_dirs makes
    assert ns["val_steps"] == 16 and ns["logfile"] == f"logs/{args.run_id}.txt"


@pytest.mark.parametrize("broken, name", [
    (SCRIPT.replace("    num_iterations = 1695", "    iterations = 1695"), "num_iterations"),
    (SCRIPT.replace("    val_loss_every = 125", "    val_loss_every = 125\n    val_loss_every = 250"), "val_loss_every"),
    (SCRIPT.replace("    val_tokens = 10485760", "    val_tokens = VAL"), "val_tokens"),
])
def test_patch_reference_names_a_constant_not_found_exactly_once(broken, name):
    with pytest.raises(ValueError, match=rf"^{name}: found [02] times"):
        patch_reference(broken, 10, 5, 262144)


CURVE = [(0, 0.0, 10.0), (100, 60_000.0, 4.0), (200, 120_000.0, 3.0)]


def test_time_to_loss_interpolates_between_the_val_points_around_the_crossing():
    seconds, steps = time_to_loss(CURVE, 3.5)   # halfway from 4.0 (step 100, 60 s) to 3.0 (step 200, 120 s)
    assert seconds == pytest.approx(90.0) and steps == pytest.approx(150.0)
    seconds, steps = time_to_loss(CURVE, 7.0)   # half of the way from step 0 (0 ms, 10.0) to step 100
    assert seconds == pytest.approx(30.0) and steps == pytest.approx(50.0)


def test_time_to_loss_exact_hits_take_the_point_itself():
    assert time_to_loss(CURVE, 4.0) == (60.0, 100.0)
    assert time_to_loss(CURVE, 3.0) == (120.0, 200.0)
    assert time_to_loss([(0, 0.0, 2.0), (10, 5000.0, 1.0)], 3.0) == (0.0, 0.0)


def test_time_to_loss_counts_the_first_crossing_of_a_non_monotone_curve():
    curve = [(0, 0.0, 10.0), (10, 1000.0, 3.0), (20, 2000.0, 3.6), (30, 3000.0, 2.9)]
    seconds, steps = time_to_loss(curve, 3.2)
    assert steps == pytest.approx(10 * 6.8 / 7) and seconds == pytest.approx(6.8 / 7)


def test_time_to_loss_never_reached_and_diverged_points():
    assert time_to_loss(CURVE, 2.9) is None
    assert time_to_loss([], 3.0) is None
    # a NaN point is no crossing and no interpolation end: the next finite point counts from the one before it
    seconds, steps = time_to_loss([(0, 0.0, 5.0), (10, 1000.0, math.nan), (20, 2000.0, 3.0)], 4.0)
    assert steps == pytest.approx(10.0) and seconds == pytest.approx(1.0)


OURS_LOG = """[node] seed 0: attempt 1, torchrun x1
step:0/110 val_loss:10.8258 train_time:0ms step_avg:0.00ms
step:1/110 train_loss:10.8251 train_time:612ms step_avg:612.00ms
step:22/110 val_loss:4.5450 train_time:12650ms step_avg:575.00ms
step:110/110 val_loss:2.5790 train_time:63140ms step_avg:574.00ms
peak memory allocated: 34004 MiB reserved: 49660 MiB
"""
# modded-nanogpt prints its source first: its f-string templates are no val points
RECORD_LOG = """logs/0f7a2c.txt
        print0(f"step:{step}/{train_steps} val_loss:{val_loss:.4f} train_time:{training_time_ms:.0f}ms")
step:0/110 val_loss:10.8258 train_time:0ms step_avg:0.03ms
step:1/110 train_time:701ms step_avg:701.00ms
[rank0]:step:88/110 val_loss:2.5740 train_time:61000ms step_avg:693.18ms
step:110/110 val_loss:2.4100 train_time:76340ms step_avg:694.00ms
"""


def test_curves_from_both_trainers_logs():
    assert curve_of(parse_log(OURS_LOG)) == [
        dict(step=0, val_loss=10.8258, train_time_ms=0.0), dict(step=22, val_loss=4.545, train_time_ms=12650.0),
        dict(step=110, val_loss=2.579, train_time_ms=63140.0)]
    assert curve_of(parse_log(RECORD_LOG)) == [
        dict(step=0, val_loss=10.8258, train_time_ms=0.0), dict(step=88, val_loss=2.574, train_time_ms=61000.0),
        dict(step=110, val_loss=2.41, train_time_ms=76340.0)]


def shards(folder: Path, train: list[int], val: list[int], seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, n in enumerate(train, start=1):
        write_shard(str(folder / f"fineweb_train_{i:06d}.bin"), rng.integers(0, 50257, n))
    for i, n in enumerate(val):
        write_shard(str(folder / f"fineweb_val_{i:06d}.bin"), rng.integers(0, 50257, n))
    return folder


def test_data_description_counts_tokens_and_the_fingerprint_follows_the_shards(tmp_path):
    d = describe_data(shards(tmp_path / "a", [1_500_000, 700_000], [300_000]))
    assert d["train_tokens"] == 2_200_000 and d["val_tokens_available"] == 300_000
    assert d["train_shard_tokens"] == [1_500_000, 700_000] and len(d["fingerprint"]) == 64
    same = describe_data(shards(tmp_path / "b", [1_500_000, 700_000], [300_000]))
    assert same["fingerprint"] == d["fingerprint"]   # the folder's name is no part of it
    files = sorted((tmp_path / "b").iterdir())
    with open(files[-1], "r+b") as f:   # the val shard's last token
        f.seek(-2, 2)
        last = f.read(2)
        f.seek(-2, 2)
        f.write(bytes([last[0] ^ 1, last[1]]))
    changed = data_fingerprint(files)
    assert changed != d["fingerprint"]
    (tmp_path / "b" / "fineweb_train_000002.bin").rename(tmp_path / "b" / "fineweb_train_000003.bin")
    assert describe_data(tmp_path / "b")["fingerprint"] not in (changed, d["fingerprint"])


def test_data_without_val_shards_is_refused(tmp_path):
    with pytest.raises(UsageError, match="fineweb_val_"):
        describe_data(shards(tmp_path, [1000], []))


def test_token_budget_of_the_reference_loader():
    need = math.ceil(200 * TOKENS_PER_STEP * 1.03) + 2 * TOKENS_PER_STEP + 1   # one shard: 81,789,482
    what, tokens = "200 steps of 393,216", 200 * TOKENS_PER_STEP
    check_token_budget([need], [4_194_306], tokens, what, TOKENS_PER_STEP, 4_194_304)
    with pytest.raises(UsageError, match=f"hold {need - 1:,} tokens but 200 steps of 393,216 need {need:,}"):
        check_token_budget([need - 1], [4_194_306], tokens, what, TOKENS_PER_STEP, 4_194_304)
    # every shard end costs one 2-step window more
    with pytest.raises(UsageError, match=f"need {need + 2 * TOKENS_PER_STEP + 1:,}"):
        check_token_budget([need // 2, need // 2 + 1], [4_194_306], tokens, what, TOKENS_PER_STEP, 4_194_304)


def test_a_variant_may_run_its_own_schedule_length_and_a_batch_schedule_reads_fewer_tokens():
    name, overrides = parse_variant("bs:seq_len_schedule=,batch_schedule=1/3:3,2/3:5,1:8,steps=300", {},
                                    ["reference", "ours"])
    assert overrides == dict(seq_len_schedule="", batch_schedule="1/3:3,2/3:5,1:8", steps=300)
    # thirds of 300 steps at 3, 5 and 8 of the 8 micro-batches of 49,152 tokens
    assert run_tokens(overrides, 300) == 100 * (3 + 5 + 8) * 49_152
    assert run_tokens(dict(seq_len_schedule="", batch_lr_scales=""), 200) == 200 * TOKENS_PER_STEP
    # the default: 8 micro-batches of 16K, 32K and 48K tokens over thirds
    assert run_tokens({}, 300) == 100 * (1 + 2 + 3) * 8 * 16_384
    with pytest.raises(UsageError, match="^--set steps: every run shares it; set it with --ours-steps"):
        parse_overrides(["steps=300"], "--set")


def test_ours_and_the_variants_run_1_3_times_the_references_steps_unless_told(tmp_path):
    """The default seq_len_schedule reads 2/3 of the reference's tokens a step: ours, the baseline and the variants
    run --ours-steps (default ceil(1.3 x --steps)); the reference keeps --steps; a variant's own steps win. Every job
    runs --seeds from --seed-base."""
    import argparse

    import yaml

    script = tmp_path / "train_gpt.py"
    script.write_text(SCRIPT)
    data = shards(tmp_path / "data", [200_000_000], [4_194_306])
    for ours_steps, want, seed_base in ((None, 260, 0), (210, 210, 1)):
        args = argparse.Namespace(steps=200, ours_steps=ours_steps, val_every=25, val_tokens=4_194_304, seeds=1,
                                  seed_base=seed_base, budget_s=None,
                                  set=[], variant=["long:muon_lr=0.06,steps=300", "cwd:muon_cautious_wd=0.43"],
                                  baseline=None, only=None, cluster=str(REPO / "cluster_configs/local-gpu.yaml"),
                                  data=str(data), reference=str(script), reference_json=None)
        runs, meta = plan_runs(args)
        assert (meta["steps"], meta["ours_steps"]) == (200, want)
        jobs = {r["label"]: yaml.safe_load(write_job(r, args, meta, tmp_path / "work").read_text()) for r in runs}
        assert jobs["reference"]["trainer"] == {} and "num_iterations = 200 " in \
            (tmp_path / "work/reference/train_gpt.py").read_text()
        assert [jobs[k]["trainer"]["steps"] for k in ("ours", "long", "cwd")] == [want, 300, want]
        assert {(j["seeds"], j["seed_base"]) for j in jobs.values()} == {(1, seed_base)}
        assert meta["seed_base"] == seed_base


def test_val_budget_is_whole_windows_of_the_reference_val_loader():
    check_token_budget([10**9], [4_194_306], 10 * TOKENS_PER_STEP, "10 steps", TOKENS_PER_STEP, 4_194_304)
    with pytest.raises(UsageError, match="holds 4,194,305 tokens but --val-tokens 4,194,304 needs 4,194,306"):
        check_token_budget([10**9], [4_194_305], 10 * TOKENS_PER_STEP, "10 steps", TOKENS_PER_STEP, 4_194_304)
    # 262,144 val tokens still read a whole window of 8 x 262,144
    with pytest.raises(UsageError, match="needs 2,097,154"):
        check_token_budget([10**9], [262_145], 10 * TOKENS_PER_STEP, "10 steps", TOKENS_PER_STEP, 262_144)


def test_overrides_are_typed_trainconfig_fields():
    assert parse_overrides(["muon_lr=0.06", "mlp_kernel=torch", "fp8_head=false"], "--set") == \
        dict(muon_lr=0.06, mlp_kernel="torch", fp8_head=False)
    merged = parse_overrides(["muon_lr=0.07"], "--variant x", dict(muon_lr=0.06, mlp_kernel="torch"))
    assert merged == dict(muon_lr=0.07, mlp_kernel="torch")


def test_a_variant_is_its_overrides_over_set_and_keeps_commas_inside_a_value():
    name, overrides = parse_variant("skip:attn_skip_layers=5,7,muon_lr=0.07", dict(muon_lr=0.06, mlp_kernel="torch"),
                                    ["reference", "ours"])
    assert name == "skip" and overrides == dict(muon_lr=0.07, mlp_kernel="torch", attn_skip_layers="5,7")
    for bad in ("ours:muon_lr=0.07", "muon_lr=0.07", "two words:muon_lr=0.07"):
        with pytest.raises(UsageError, match="expected NAME:KEY=VALUE"):
            parse_variant(bad, {}, ["reference", "ours"])
    with pytest.raises(UsageError, match="^--variant x muon_lrr: not a TrainConfig field"):
        parse_variant("x:muon_lrr=1", {}, [])


@pytest.mark.parametrize("item, message", [
    ("muon_l=0.06", "--set muon_l: not a TrainConfig field; did you mean muon_lr?"),
    ("steps=50", "--set steps: every run shares it; set it with --ours-steps"),
    ("seed=3", "--set seed: every run shares it; set it with --seeds"),
    ("muon_lr=fast", "--set muon_lr=fast: must be float"),
    ("attention=sparse", "--set: attention: must be auto, flex or dense (got 'sparse')"),
    ("muon_lr", "--set muon_lr: expected KEY=VALUE"),
])
def test_bad_overrides_are_one_sentence(item, message):
    with pytest.raises(UsageError) as e:
        parse_overrides([item], "--set")
    assert str(e.value).startswith(message)


def seed(curve, state="succeeded", ms=None):
    return dict(seed=0, state=state, reason="", ms_per_step=ms,
                curve=[dict(step=s, train_time_ms=t, val_loss=v) for s, t, v in curve])


META = dict(gpu="NVIDIA H200", steps=100, val_every=50, val_tokens=4_194_304, tokens_per_step=TOKENS_PER_STEP,
            data=dict(dir="/d", fingerprint="f" * 64))


def test_assemble_targets_the_reference_mean_final_loss_and_times_every_run_to_it():
    ref = dict(label="reference", kind="reference", overrides={}, state="succeeded", seeds=[
        seed([(0, 0, 10.0), (50, 35_000, 4.0), (100, 70_000, 3.0)], ms=700.0),
        seed([(0, 0, 10.0), (50, 35_000, 4.2), (100, 72_000, 3.2)], ms=720.0)])
    ours = dict(label="ours", kind="ours", overrides={}, state="succeeded", seeds=[
        seed([(0, 0, 10.0), (50, 28_000, 3.5), (100, 57_000, 2.9)], ms=570.0)])
    broken = dict(label="lr", kind="variant", overrides=dict(muon_lr=1.0), state="failed",
                  seeds=[seed([(0, 0, 10.0)], state="failed")])
    slow = dict(label="slow", kind="variant", overrides={}, state="succeeded",
                seeds=[seed([(0, 0, 10.0), (100, 90_000, 3.4)], ms=900.0)])
    report = assemble(META, [ref, ours, broken, slow])
    assert report["reference_final_loss"] == pytest.approx(3.1)   # mean of 3.0 and 3.2
    assert report["reference_time_to_loss_s"] == pytest.approx(71.0)   # the mean curve ends there at 71 s
    # ours: from 3.5 at 28 s to 2.9 at 57 s, 3.1 is 2/3 of the way
    assert report["ours_time_to_loss_s"] == pytest.approx(28 + 29 * 2 / 3)
    assert report["time_to_loss_ratio"] == pytest.approx((28 + 29 * 2 / 3) / 71.0)
    r_ref, r_ours, r_broken, r_slow = report["runs"]
    assert r_ref["time_to_loss_spread"] == dict(reached=1, of=2, min=66.5, max=66.5, mean=66.5, std=None)   # 3.2 never hits 3.1
    assert [s["time_to_loss_s"] for s in r_ref["seeds"]] == [pytest.approx(35 + 35 * 0.9), None]
    assert r_ref["ms_per_step"] == pytest.approx(710.0) and r_ref["time_to_loss_ratio"] == pytest.approx(1.0)
    assert r_ours["steps_to_loss"] == pytest.approx(50 + 50 * 2 / 3) and r_ours["seeds"][0]["steps_to_loss"] is not None
    assert r_broken["curve"] == [] and r_broken["time_to_loss_s"] is None and r_broken["time_to_loss_ratio"] is None
    assert r_slow["time_to_loss_s"] is None and r_slow["final_val_loss"] == 3.4 and r_slow["final_train_time_s"] == 90.0
    json.dumps(report)   # the whole report is JSON
    # a reused reference (already summarized) gives the same figures
    again = assemble(META, [r_ref, ours])
    assert again["reference_final_loss"] == pytest.approx(3.1) and again["ours_time_to_loss_s"] == report["ours_time_to_loss_s"]
    assert r_ours["vs_ours"] == pytest.approx(1.0) and r_ref["vs_ours"] == pytest.approx(71.0 / (28 + 29 * 2 / 3))


def test_a_reference_from_another_gpu_gives_its_loss_target_but_no_time_ratio():
    ref = dict(label="reference", kind="reference", overrides={}, state="succeeded",
               seeds=[seed([(0, 0, 10.0), (100, 70_000, 3.0)], ms=700.0)])
    ours = dict(label="ours", kind="ours", overrides={}, state="succeeded",
                seeds=[seed([(0, 0, 10.0), (50, 30_000, 3.5), (100, 60_000, 2.5)], ms=600.0)])
    fast = dict(label="fast", kind="variant", overrides=dict(steps=80), state="succeeded",
                seeds=[seed([(0, 0, 10.0), (80, 40_000, 3.0)], ms=500.0)])
    report = assemble(dict(META, reference_gpu="NVIDIA H200", gpu="NVIDIA H100 80GB HBM3"), [ref, ours, fast])
    assert report["reference_final_loss"] == 3.0 and report["time_to_loss_ratio"] is None
    r_ref, r_ours, r_fast = report["runs"]
    assert r_ours["time_to_loss_s"] == pytest.approx(45.0) and r_ours["time_to_loss_ratio"] is None
    assert r_fast["vs_ours"] == pytest.approx(40.0 / 45.0) and r_ref["vs_ours"] is None
    same = assemble(dict(META, reference_gpu="NVIDIA H200", gpu="NVIDIA H200"), [ref, ours])
    assert same["time_to_loss_ratio"] == pytest.approx(45.0 / 70.0)


def test_assemble_without_a_reference_has_no_target():
    report = assemble(META, [dict(label="ours", kind="ours", overrides={}, state="succeeded",
                                  seeds=[seed([(0, 0, 10.0), (100, 50_000, 3.0)])])])
    assert report["reference_final_loss"] is None and report["ours_time_to_loss_s"] is None
    assert report["runs"][0]["final_val_loss"] == 3.0


def test_a_reference_json_must_match_steps_schedule_tokens_and_data():
    ref = dict(label="reference", kind="reference", overrides={}, state="succeeded",
               seeds=[seed([(0, 0, 10.0), (100, 70_000, 3.0)])])
    old = dict(META, runs=[ref])
    assert check_reference_json(old, META) is ref
    for key, value in (("steps", 110), ("val_every", 22), ("val_tokens", 262_144), ("tokens_per_step", 196_608)):
        with pytest.raises(UsageError, match=f"it has {key} {value} where this run has"):
            check_reference_json(dict(old, **{key: value}), META)
    with pytest.raises(UsageError, match="differ from --data"):
        check_reference_json(dict(old, data=dict(dir="/e", fingerprint="e" * 64)), META)
    with pytest.raises(UsageError, match="no finished reference run"):
        check_reference_json(dict(old, runs=[dict(ref, seeds=[seed([], state="failed")])]), META)


def test_results_file_names_the_gpu_and_the_tag():
    assert results_path(Path("r"), "NVIDIA H200", None) == Path("r/recipe-nvidia-h200.json")
    assert results_path(Path("r"), "NVIDIA H100 80GB HBM3", "stop21") == Path("r/recipe-nvidia-h100-80gb-hbm3-stop21.json")


@pytest.mark.parametrize("case", ["bad key", "small data", "seed base"])
def test_the_cli_refuses_before_creating_anything(tmp_path, case, _isolated_speedrun_home):
    script = tmp_path / "train_gpt.py"
    script.write_text(SCRIPT)
    # 2 steps: 2 x 393,216 x 1.03 + 786,433 tokens of train; one val window of 2,097,152 + 2
    data = shards(tmp_path / "data", [1_500_000 if case == "small data" else 1_700_000], [2_097_154])
    cmd = [sys.executable, str(REPO / "bench" / "recipe.py"), "--data", str(data), "--steps", "2", "--val-every", "1",
           "--val-tokens", "262144", "--reference", str(script), "--work", str(tmp_path / "work"),
           "--log-dir", str(tmp_path / "logs"), "--out", str(tmp_path / "out")]
    if case == "bad key":
        cmd += ["--set", "muon_lr=0.06", "--variant", "x:muon_lrr=0.07"]
    if case == "seed base":
        cmd += ["--seed-base", "-1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and done.stdout == ""
    if case == "bad key":
        assert lines[0] == "bench/recipe.py: --variant x muon_lrr: not a TrainConfig field; did you mean muon_lr?"
    elif case == "seed base":
        assert lines[0] == "bench/recipe.py: --seed-base -1: must be >= 0 (the first seed)"
    else:
        assert lines[0].startswith("bench/recipe.py: --data: the train shards hold 1,500,000 tokens but 2 steps of "
                                   "393,216 need 1,596,458 ") and lines[0].endswith("lower --steps")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "train_gpt.py"]
    assert not any(_isolated_speedrun_home.iterdir())   # no run was recorded


def test_the_target_is_the_reference_final_loss_even_when_it_dipped_lower_before():
    ref = dict(label="reference", kind="reference", overrides={}, state="succeeded",
               seeds=[seed([(0, 0, 10.0), (50, 35_000, 3.0), (100, 70_000, 3.1)])])
    report = assemble(META, [ref])
    assert report["reference_final_loss"] == 3.1
    assert report["reference_time_to_loss_s"] == pytest.approx(35 * 6.9 / 7)   # its first crossing, before its end


def test_the_gpu_name_keeps_its_spaces(monkeypatch):
    """The probe prints the torch version and the device name on two lines; 'NVIDIA H200' is one name."""
    import recipe

    def fake_run(argv, **kwargs):
        return subprocess.CompletedProcess(argv, 0, stdout="2.11.0\nNVIDIA H200\n", stderr="")

    monkeypatch.setattr(recipe.subprocess, "run", fake_run)
    assert recipe.gpu_and_torch() == ("NVIDIA H200", "2.11.0")


def test_a_run_starts_only_if_it_would_end_inside_the_budget():
    assert next_run_fits(0.0, [], 10.0) and next_run_fits(500.0, [], 10.0)   # the first run: nothing to go by
    assert next_run_fits(200.0, [150.0, 190.0], 390.0) and not next_run_fits(200.1, [150.0, 190.0], 390.0)
    assert next_run_fits(1e9, [190.0], None)


def test_with_a_budget_the_runs_that_would_end_past_it_are_named_and_not_started(tmp_path, monkeypatch, capsys):
    """Each (fake) run takes 100 s of a 250 s budget: ours and the first variant run, the second would end at 300 s;
    the JSON keeps the two and names the one left out."""
    import recipe

    clock = [0.0]
    monkeypatch.setattr(recipe.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(recipe, "gpu_and_torch", lambda: ("NVIDIA H200", "2.11"))

    def fake_launch(run, args, meta, work, log_dir):
        clock[0] += 100.0
        curve = [(0, 0, 10.0), (25, 5_000, 3.0)]
        return dict(run, rc=0, wall_s=100.0, state="succeeded", seeds=[seed(curve, ms=200.0)])

    monkeypatch.setattr(recipe, "launch", fake_launch)
    script = tmp_path / "train_gpt.py"
    script.write_text(SCRIPT)
    data = shards(tmp_path / "data", [1_700_000], [2_097_154])
    rc = recipe.main(["--data", str(data), "--steps", "2", "--val-every", "1", "--val-tokens", "262144",
                      "--reference", str(script), "--only", "ours,a,b", "--variant", "a:muon_lr=0.06",
                      "--variant", "b:muon_lr=0.07", "--budget-s", "250", "--work", str(tmp_path / "work"),
                      "--out", str(tmp_path / "out"), "--tag", "t"])
    assert rc == 0
    report = json.loads((tmp_path / "out/recipe-nvidia-h200-t.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["ours", "a"] and report["not_run"] == ["b"]
    assert "not run: b: each would end past --budget-s 250 (the longest run took 100 s)" in capsys.readouterr().out
