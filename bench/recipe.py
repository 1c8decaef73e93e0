"""The yardstick: time to the loss the reference record script reaches, ours against it, on the same real text.

    python bench/recipe.py --data DIR [--steps 200] [--ours-steps N] [--val-every 25] [--val-tokens 4194304] [--seeds K]
        [--seed-base S]
        [--set KEY=VALUE ...] [--variant NAME:KEY=VALUE[,KEY=VALUE...] ...] [--baseline DIR]
        [--reference PATH | --reference-json PATH] [--only LABELS] [--tag X] [--work DIR] [--log-dir DIR]
        [--budget-s SECONDS]

Each run is one `speedrun launch JOB --cluster cluster_configs/local-gpu.yaml --set cluster.gpus_per_node=1
--store <its own folder> --seeds K` (seeds S .. S+K-1) on the shards of --data, in this order:
the reference (../shared/reference/record28_train_gpt.py as `script:`, a copy with its schedule constants set,
writing its log to logs/final/ as published; --steps of 393,216 tokens; its seeds are repetitions) unless its curve
comes from an earlier JSON; ours; the baseline (DIR's CLI and trainer); each variant. The target is the
reference's final val loss (of its mean curve over repetitions); a run's time to it is where its mean curve first
reaches it, interpolated from the val point before. Ours, the baseline and the variants run --ours-steps (by
default 1.3 x --steps: the default seq_len_schedule reads 2/3 of the reference's tokens a step over its thirds,
and at 260 steps it reached the 200-step reference's loss at step 235.2, the margin ours had before it, at 175 of
200); a variant may set its own `steps`.
bench/results/recipe-<gpu>[-TAG].json is rewritten after every run, so a cut-off keeps what finished. With
--budget-s (a device call's limit, less what the command does before), a run is started only if it would end inside
it, taken to last as long as the longest run so far; the runs left out are named, and the JSON lists them.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from recipe_report import assemble, curve_of, mean_curve, print_tables, summarize_run, time_to_loss  # noqa: E402,F401
DEFAULT_REFERENCE = REPO.parent / "shared/reference/record28_train_gpt.py"
DEFAULT_CLUSTER = REPO / "cluster_configs/local-gpu.yaml"
TOKENS_PER_STEP = 8 * 48 * 1024            # the reference's step: 8 micro-batches of 48K tokens
REFERENCE_VAL_BATCH = 4 * 64 * 1024        # its val_seq_len on one GPU; it asserts val_tokens is a multiple
REFERENCE_VAL_WINDOW = 8 * REFERENCE_VAL_BATCH   # its val loader needs a whole window of 8 batches in the shard
BOS_SKIP = 1.03                            # BOS-aligned batches skip the rest of a document: ~3% more tokens read
MIB = 1 << 20
FIXED = {"steps": "--ours-steps", "val_every": "--val-every", "val_tokens": "--val-tokens", "seed": "--seeds"}
OURS_STEPS = 1.3                           # --ours-steps' default, times --steps (the docstring says why)


class UsageError(Exception):
    """One sentence: what is wrong with the arguments or the data, and the fix. Exit 2, nothing created."""


_CONSTANT = r"^([ \t]*{name}[ \t]*=[ \t]*)[0-9_]+"


def patch_reference(text: str, steps: int, val_every: int, val_tokens: int) -> str:
    """The record script with its schedule constants set; every other byte as published (its logs/final/ is made
    by the job's script_dirs, as for any record script). ValueError names a constant not found exactly once."""
    for name, value in (("num_iterations", steps), ("val_loss_every", val_every), ("val_tokens", val_tokens)):
        text, n = re.subn(_CONSTANT.format(name=name), rf"\g<1>{value}", text, flags=re.M)
        if n != 1:
            raise ValueError(f"{name}: found {n} times in the reference script, expected one `{name} = <integer>` line")
    return text


def parse_overrides(items: list[str], where: str, base: dict | None = None, own_steps: bool = False) -> dict:
    """KEY=VALUE items typed as TrainConfig fields, merged over base and validated as a whole config; with
    own_steps (a variant), `steps` is allowed: that run's schedule length."""
    from trainer.__main__ import parse_value
    from trainer.config import TrainConfig

    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    out = dict(base or {})
    for item in items:
        key, sep, text = (s.strip() for s in item.partition("="))
        if not sep or not key:
            raise UsageError(f"{where} {item}: expected KEY=VALUE with KEY a TrainConfig field, e.g. muon_lr=0.06")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            raise UsageError(f"{where} {key}: not a TrainConfig field" + (f"; did you mean {close[0]}?" if close else
                             "; trainer/config.py lists them"))
        if key in FIXED and not (own_steps and key == "steps"):
            raise UsageError(f"{where} {key}: every run shares it; set it with {FIXED[key]}")
        try:
            out[key] = parse_value(key, text)
        except ValueError as e:
            raise UsageError(f"{where} {item}: {str(e).rsplit(': ', 1)[-1]}") from None
    try:
        TrainConfig.from_dict(out)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{where}: {e}") from None
    return out


def parse_variant(text: str, base: dict, taken: list[str]) -> tuple[str, dict]:
    """NAME:KEY=VALUE[,KEY=VALUE...] over base; a comma not followed by KEY= stays in its value (layers=3,7)."""
    name, sep, items = text.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name) or name in taken:
        raise UsageError(f"--variant {text}: expected NAME:KEY=VALUE[,KEY=VALUE...] with a new NAME of letters, "
                         f"digits, . _ - (taken: {', '.join(taken)})")
    return name, parse_overrides([s for s in re.split(r",(?=\s*\w+=)", items) if s], f"--variant {name}", base,
                                 own_steps=True)


def run_tokens(overrides: dict, steps: int) -> int:
    """Train tokens a run of ours reads in its steps: its batch_schedule's or seq_len_schedule's (record-46), else
    the full batch every step."""
    from trainer.config import TrainConfig
    from trainer.schedules import step_tokens

    cfg = TrainConfig.from_dict(dict(overrides, steps=steps))
    return sum(step_tokens(cfg, s) for s in range(steps))


def check_token_budget(train: list[int], val: list[int], tokens: int, what: str, tokens_per_step: int,
                       val_tokens: int) -> None:
    """The loaders never cycle: train needs the run's tokens (`what` says whose), +3% skipped at document starts and
    a 2-step window left at each shard's end; val, whole windows of 8 batches in the first val shard."""
    need = math.ceil(tokens * BOS_SKIP) + len(train) * (2 * tokens_per_step + 1)
    if sum(train) < need:
        raise UsageError(f"--data: the train shards hold {sum(train):,} tokens but {what} need {need:,} (3% skipped "
                         f"at document starts, {2 * tokens_per_step + 1:,} left at each shard's end); prepare more "
                         "text or lower --steps")
    val_need = max(val_tokens + 1, math.ceil(val_tokens / REFERENCE_VAL_WINDOW) * REFERENCE_VAL_WINDOW + 2)
    first = val[0] if val else 0
    if first < val_need:
        raise UsageError(f"--data: the first val shard holds {first:,} tokens but --val-tokens {val_tokens:,} needs "
                         f"{val_need:,} (the reference reads windows of {REFERENCE_VAL_WINDOW:,}); lower --val-tokens")


def data_fingerprint(files: list[Path]) -> str:
    """sha256 over each shard's name, size, first and last MiB: reads 2 MiB a shard, and sees another corpus or cut."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(MIB) + os.pread(fh.fileno(), MIB, max(0, size - MIB)))
    return h.hexdigest()


def describe_data(data: Path) -> dict:
    from trainer.data import ShardError, read_header

    train, val = sorted(data.glob("fineweb_train_*.bin")), sorted(data.glob("fineweb_val_*.bin"))
    if not train or not val:
        raise UsageError(f"--data {data}: needs fineweb_train_*.bin and fineweb_val_*.bin shards "
                         "(make them with `speedrun data prepare`)")
    try:
        train_n, val_n = [read_header(str(f)) for f in train], [read_header(str(f)) for f in val]
    except ShardError as e:
        raise UsageError(f"--data: {e}") from None
    return dict(dir=str(data), fingerprint=data_fingerprint(train + val), train_tokens=sum(train_n),
                val_tokens_available=sum(val_n), train_shard_tokens=train_n, val_shard_tokens=val_n)


def check_reference_json(old: dict, meta: dict) -> dict:
    """The reference run of an earlier JSON, if it was measured as this run would measure it."""
    for key in ("steps", "val_every", "val_tokens", "tokens_per_step"):
        if old.get(key) != meta[key]:
            raise UsageError(f"--reference-json: it has {key} {old.get(key)} where this run has {meta[key]}; "
                             "measure the reference again (leave out --reference-json)")
    if old.get("data", {}).get("fingerprint") != meta["data"]["fingerprint"]:
        raise UsageError(f"--reference-json: its shards ({old.get('data', {}).get('dir')}) differ from --data "
                         f"{meta['data']['dir']} (fingerprint); measure the reference on these shards")
    ref = next((r for r in old.get("runs", []) if r.get("kind") == "reference"), None)
    if ref is None or not summarize_run(ref, None)["curve"]:
        raise UsageError("--reference-json: it holds no finished reference run; measure the reference again")
    return ref


def results_path(out: Path, gpu: str, tag: str | None) -> Path:
    from kernels import gpu_slug   # bench/kernels.py: 'NVIDIA H200' -> 'nvidia-h200'

    return out / f"recipe-{gpu_slug(gpu)}{'-' + tag if tag else ''}.json"


def plan_runs(args) -> tuple[list[dict], dict]:
    """Every check that can refuse, before anything is created. Returns the runs and the meta of the JSON."""
    if args.ours_steps is None:
        args.ours_steps = math.ceil(args.steps * OURS_STEPS)
    if args.steps < 1 or args.ours_steps < 1 or args.val_every < 1 or args.seeds < 1:
        raise UsageError("--steps, --ours-steps, --val-every and --seeds: must be >= 1")
    if args.seed_base < 0:
        raise UsageError(f"--seed-base {args.seed_base}: must be >= 0 (the first seed)")
    if args.budget_s is not None and args.budget_s <= 0:
        raise UsageError(f"--budget-s {args.budget_s:g}: must be > 0 seconds (leave it out for no budget)")
    if args.val_tokens < 1 or args.val_tokens % REFERENCE_VAL_BATCH:
        raise UsageError(f"--val-tokens {args.val_tokens}: must be a multiple of {REFERENCE_VAL_BATCH:,} "
                         "(the reference's validation batch on one GPU)")
    sets = parse_overrides(args.set, "--set")
    runs = [dict(label="reference", kind="reference", overrides={}, code=str(REPO)),
            dict(label="ours", kind="ours", overrides=sets, code=str(REPO))]
    if args.baseline:
        base = Path(args.baseline).resolve()
        if not (base / "trainer/train.py").is_file() or not (base / "orchestrator/cli.py").is_file():
            raise UsageError(f"--baseline {args.baseline}: no trainer/train.py and orchestrator/cli.py there; give "
                             "another checkout of this repo (git worktree add DIR REV)")
        runs.append(dict(label="baseline", kind="baseline", overrides=sets, code=str(base)))
    for v in args.variant:
        name, overrides = parse_variant(v, sets, [r["label"] for r in runs])
        runs.append(dict(label=name, kind="variant", overrides=overrides, code=str(REPO)))
    only = [s for s in (args.only or "").split(",") if s] or [r["label"] for r in runs]
    if set(only) - {r["label"] for r in runs}:
        raise UsageError(f"--only {args.only}: the runs of this call are {', '.join(r['label'] for r in runs)}")
    runs = [r for r in runs if r["label"] in only or (r["kind"] == "reference" and args.reference_json)]
    cluster = Path(args.cluster).resolve()
    if not cluster.is_file():
        raise UsageError(f"--cluster {args.cluster}: no such cluster config")
    meta = dict(command=shlex.join([sys.executable, *sys.argv]), set=sets, steps=args.steps,
                ours_steps=args.ours_steps, val_every=args.val_every,
                val_tokens=args.val_tokens, tokens_per_step=TOKENS_PER_STEP, seeds=args.seeds, seed_base=args.seed_base,
                cluster=str(cluster), data=describe_data(Path(args.data).resolve()))
    for run in runs:
        if run["kind"] == "reference":
            tokens, what = args.steps * TOKENS_PER_STEP, f"{args.steps} steps of {TOKENS_PER_STEP:,}"
        else:
            steps = run["overrides"].get("steps", args.ours_steps)
            tokens = run_tokens(run["overrides"], steps)
            what = f"{run['label']}'s {steps} steps ({tokens:,} tokens)"
        check_token_budget(meta["data"]["train_shard_tokens"], meta["data"]["val_shard_tokens"], tokens, what,
                           TOKENS_PER_STEP, args.val_tokens)
    try:
        if args.reference_json:
            old = json.loads(Path(args.reference_json).read_text())
            runs[0] = dict(check_reference_json(old, meta), reused_from=str(Path(args.reference_json).resolve()))
            meta["reference_script"], meta["reference_gpu"] = old.get("reference_script"), old.get("gpu")
        elif runs[0]["kind"] == "reference":
            meta["reference_script"] = str(Path(args.reference).resolve())
            runs[0]["script_text"] = patch_reference(Path(args.reference).read_text(), args.steps, args.val_every,
                                                     args.val_tokens)
    except (OSError, ValueError, AttributeError) as e:   # unreadable, not JSON, or a constant not found once
        flag = f"--reference-json {args.reference_json}" if args.reference_json else f"--reference {args.reference}"
        raise UsageError(f"{flag}: {getattr(e, 'strerror', None) or e}") from None
    return runs, meta


def write_job(run: dict, args, meta: dict, work: Path) -> Path:
    """The run's job YAML (and, for the reference, its patched script) in the work folder."""
    import yaml

    name = "recipe-" + re.sub(r"[^a-z0-9._-]", "-", run["label"].lower())
    # staged into the work folder: the cluster's data_dir may hold another source's shards, which staging deletes
    spec = dict(name=name, seeds=args.seeds, seed_base=args.seed_base, checkpoint=dict(every=0, final=False), data=dict(
        source=meta["data"]["dir"], dir=str(work / "shards"), val_shards=len(meta["data"]["val_shard_tokens"])),
        trainer=dict(dict(steps=args.ours_steps, val_every=args.val_every, val_tokens=args.val_tokens),
                     **run["overrides"]))
    if run["kind"] == "reference":
        spec.update(trainer={}, script=str(work / "reference" / "train_gpt.py"))
        Path(spec["script"]).parent.mkdir(parents=True, exist_ok=True)
        Path(spec["script"]).write_text(run.pop("script_text"))
    job = work / "jobs" / f"{name}.yaml"
    job.parent.mkdir(parents=True, exist_ok=True)
    job.write_text(yaml.safe_dump(spec))
    return job


def read_seeds(store_dir: Path, launch_output: str) -> tuple[str | None, list[dict]]:
    """The sweep a launch wrote to its own store (the id it printed, else the store's only one) and its seeds."""
    from orchestrator.results import load_sweep_runs
    from orchestrator.runs import list_sweeps
    from orchestrator.summary import json_or_none
    from orchestrator.sweep import seed_prefix
    from orchestrator.store import open_store

    store = open_store(store_dir)
    sweeps = list_sweeps(store) if store_dir.is_dir() else []
    said = [s for s in re.findall(r"launched (\S+)", launch_output) if s in sweeps]
    sweep = said[-1] if said else (sweeps[0] if len(sweeps) == 1 else None)
    seeds = []
    for one in load_sweep_runs(store, sweep) if sweep else []:
        # the node runner's records: a seed that died early has none, and its log says why
        env, timings = (json_or_none(store, f"{seed_prefix(sweep, one.summary.seed)}/{n}") or {}
                        for n in ("env.json", "timings.json"))
        seeds.append(dict(seed=one.summary.seed, state="succeeded" if one.summary.complete else "failed",
                          reason=one.summary.reason, ms_per_step=one.summary.step_avg_ms,
                          final_val_loss=one.summary.val_loss, curve=curve_of(one.result) if one.result else [],
                          code_hash=env.get("trainer_code_hash"), seed_wall_s=timings.get("seed_wall_s")))
    return sweep, seeds


def launch(run: dict, args, meta: dict, work: Path, log_dir: Path) -> dict:
    """One `speedrun launch` of the run's checkout, its output in a log; a failure is reported, not raised."""
    from orchestrator.provenance import trainer_code_hash

    label, root = run["label"], Path(run["code"])
    job, store, log = write_job(run, args, meta, work), work / "stores" / label, log_dir / f"{label}.log"
    cmd = [sys.executable, "-m", "orchestrator.cli", "launch", str(job), "--cluster", meta["cluster"],
           "--set", "cluster.gpus_per_node=1", "--store", str(store), "--seeds", str(args.seeds)]
    # cwd and PYTHONPATH pick the checkout: its orchestrator's REPO_ROOT is where the node runs `-m trainer`
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    print(f"{label}: {shlex.join(cmd)} (in {root}; log {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    text = log.read_text(errors="replace")
    sweep, seeds = read_seeds(store, text)
    out = dict(run, rc=rc, wall_s=time.perf_counter() - t0, store=str(store), log=str(log), sweep_id=sweep, seeds=seeds,
               state="succeeded" if rc == 0 and any(s["curve"] for s in seeds) else "failed")
    if out["state"] == "failed":
        out["log_tail"] = text.splitlines()[-20:]
        print(f"{label}: FAILED (exit {rc}); the end of {log}:\n" + "\n".join(out["log_tail"]), file=sys.stderr)
    for s in seeds if run["kind"] == "reference" else []:
        s["code_hash"] = None   # the node hashes this checkout's trainer/, which the record script never runs
    if run["kind"] != "reference":   # the node's REPO_ROOT must have been this run's checkout
        out["expected_code_hash"] = trainer_code_hash(root)
        ran = {s["code_hash"] for s in seeds if s["code_hash"]} - {out["expected_code_hash"]}
        if ran:
            print(f"{label}: WARNING: the node ran trainer code {sorted(ran)}, not {root}'s", file=sys.stderr)
    return out


def next_run_fits(elapsed_s: float, walls_s: list[float], budget_s: float | None) -> bool:
    """Whether one more run ends inside budget_s seconds of this command, taken to last as long as the longest run
    so far; the first run always starts (there is nothing to go by), and so does every run without a budget."""
    return budget_s is None or not walls_s or elapsed_s + max(walls_s) <= budget_s


def gpu_and_torch() -> tuple[str, str]:
    """Asked in a child process, so this one never holds a CUDA context while the runs train."""
    probe = "import torch; print(torch.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    lines = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.splitlines()
    return (lines[1], lines[0]) if len(lines) == 2 else ("unknown", "unknown")   # a name has spaces: lines, not words


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()   # --budget-s counts from here
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder of fineweb_train_*.bin and fineweb_val_*.bin shards")
    p.add_argument("--steps", type=int, default=200, help="the reference's schedule length")
    p.add_argument("--ours-steps", type=int, help="ours', the baseline's and the variants' (default 1.3 x --steps)")
    p.add_argument("--val-every", type=int, default=25)
    p.add_argument("--val-tokens", type=int, default=4_194_304, help="val tokens (a multiple of 262,144)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per run (repetitions for the reference)")
    p.add_argument("--seed-base", type=int, default=0, metavar="S",
                   help="the first seed: a second seed of an earlier row is --seed-base 1")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a TrainConfig override of ours")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE...]",
                   help="one more run of ours with these overrides on top of --set, labelled NAME")
    p.add_argument("--baseline", metavar="DIR", help="one more run of the trainer of another checkout of this repo")
    p.add_argument("--reference", default=str(DEFAULT_REFERENCE), help="the record train_gpt.py")
    p.add_argument("--reference-json", metavar="PATH", help="reuse the reference's curve from an earlier recipe JSON")
    p.add_argument("--only", metavar="LABELS", help="run only these, comma-separated (reference, ours, baseline, NAME)")
    p.add_argument("--tag", help="results file recipe-<gpu>-TAG.json")
    p.add_argument("--work", help="folder for job files, staged shards and stores (default: a new temp folder)")
    p.add_argument("--log-dir", help="launch logs (default: WORK/logs)")
    p.add_argument("--cluster", default=str(DEFAULT_CLUSTER), help="cluster config every run launches on")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--budget-s", type=float, metavar="SECONDS",
                   help="start a run only if it would end within this many seconds of the command's start")
    args = p.parse_args(argv)
    try:
        runs, meta = plan_runs(args)
    except UsageError as e:
        print(f"bench/recipe.py: {e}", file=sys.stderr)
        return 2
    gpu, torch_version = gpu_and_torch()
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="recipe-"))
    log_dir = Path(args.log_dir).resolve() if args.log_dir else work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = results_path(Path(args.out), gpu, args.tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(gpu=gpu, torch=torch_version, date=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), **meta, work=str(work), log_dir=str(log_dir))
    print(f"work folder {work}; launch logs in {log_dir}; results {path}", flush=True)
    done: list[dict] = []

    def write() -> dict:   # after every run, and once more naming the runs left out: a cut-off keeps what finished
        report = assemble(meta, done)
        path.write_text(json.dumps(report, indent=2))
        return report

    for i, run in enumerate(runs):
        walls = [r["wall_s"] for r in done if r.get("wall_s")]
        if not run.get("reused_from") and not next_run_fits(time.monotonic() - start, walls, args.budget_s):
            meta["not_run"] = [r["label"] for r in runs[i:]]
            print(f"not run: {', '.join(meta['not_run'])}: each would end past --budget-s {args.budget_s:g} (the "
                  f"longest run took {max(walls):.0f} s)", flush=True)
            report = write()
            break
        done.append(run if run.get("reused_from") else launch(run, args, meta, work, log_dir))
        report = write()
    print_tables(report)
    print(f"wrote {path}")
    return 0 if all(r["state"] == "succeeded" for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
