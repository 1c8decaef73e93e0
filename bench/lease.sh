# The steps of a GPU lease, as shell functions: `source bench/lease.sh` in the device command, then call them.
# The yardstick's corpus (../shared/realtext, `make_jsonl.py --mb 320`, `xz -6`: ~82 MB) is over one call's
# 64 MiB, so it travels in pieces over two calls of one warm machine (a call within 30 s of the last):
#
#   here:    lease_pieces /work/rt/docs.jsonl.xz .rt        # .rt/part.aa, part.ab, part.ac (37.7 MB at most)
#   call 1:  carry .whl and .rt holding part.aa:   lease_install; lease_small .rt/part.aa; <compile-cache probe, tests>
#   call 2:  carry .whl and .rt holding the rest:  lease_install; lease_full .rt/part.ab .rt/part.ac;
#            lease_recipe TAG --only ours,NAME --variant NAME:KEY=VALUE
#
# Budget (one H100, 2026-12-05): a 200-step run takes ~250 s of wall (75 s cold compile and warm-up, 127 s of
# training, 22 s of validation): ours and one variant fit a 600 s call beside the shards, not two variants.
# One lease, 2026-12-06: call 1 with the GPU tests 136 s, call 2 (shards + ours + one variant) 564 s, then on the
# same warm machine (ours' compile cached) ours + another variant in 399 and 449 s: three A/Bs in ~1,600 s of 1,800.
# Issue 26's lease, 2026-12-06: .rt holding bpe/ and reference/ (../shared/reference copied, not committed); call 1
# lease_cache_probe bench/cache_probe.yaml 3 (168 s), call 2 lease_record28 1 8.6 (record-28's cold compile: 526 s),
# call 3 lease_record28 2 3.9; lease_record28 3 3.9 fresh (454 s), then a fresh-node --seeds 2 probe (81 s): ~1,400 s
# of 1,800 with the machine's start.
# Issue 22's lease of 2026-12-06 (evening): two refused starts first cost 271 s, the machine's start ~350 s; call 1
# lease_small, lease_warm --only ours,sched (cold compiles, 94 and 152 s of warm-up) and pytest -k cuda_graphs (424 s);
# call 2 lease_full + lease_recipe s --only ours,sched (434 s); call 3 lease_recipe t --only ours,cwd (387 s). Since
# then ours runs the default seq_len_schedule for --ours-steps 260 (~115 s of training, ~150 s a run with a warm cache).
# 2026-12-06 (late): every start refused, 1,516 s of 1,800 spent asking; planned then: call 1 lease_small +
# lease_warm --only ours,bo (backout) + pytest -k later_records, call 2 lease_full + lease_recipe ours,bo; after
# that one call can hold only `lease_node_probe bench/cache_probe.yaml --set trainer.compile_trace_cache=true`.
# 2026-12-07: 1,261 s of 1,800 spent asking, then one H100: lease_install + two GPU test files (52 s), -k later_records
# (120 s), lease_node_probe bench/cache_probe.yaml (228 s: cold 136 s, same node 44 s, fresh node 44 s). With the
# trace-cache fix, the next probe is `lease_node_probe bench/cache_probe.yaml --set trainer.compile_trace_cache=true`.
# 2026-12-07 (second session): 1,490 s of refusals, then one H100 call (310 s): lease_install, the cautious decay
# kernel's tests and that probe (cold 207 s of launch, the next two died loading: fixed since, bench/NOTES.md). Next:
# the same probe, then `lease_node_launch 4 bench/cache_probe.yaml` (switch off) in the same call.
# 2026-12-07 (third session): every start refused or held back by the tool's wait (H200 and H100) from 06:05 on;
# with the budget down to ~600 s the last try was the probe alone (`lease_install; lease_node_probe
# bench/cache_probe.yaml --set trainer.compile_trace_cache=true`, carry .whl only, limit 420 s).
# 2026-12-07 (fourth session): two refused starts (271 s), then one H100 for three calls: call 1 lease_small,
# the trace cache's GPU test and lease_warm --only ours (237 s); call u lease_full + ours, floor (405 s); call v
# ours, lrs, vo (cut at 540 s in vo's step 237: three runs do not fit one call with the install). 246 s left.
# Since: give lease_recipe `--budget-s` (the call's limit less ~30 s of install, and the shards' ~40 s in call 2),
# and a run that cannot finish is not started (recipe.py names it) where this one cost 170 s of device time.
# 2026-12-07 (evening): four refused or held-back starts (376 s), then one H100: call 1 lease_small, the trace cache's
# GPU test, lease_warm --only ours,vo,lrs (332 s with the start's wait); call w lease_full + lease_recipe w --only
# ours,vo,lrs --seed-base 1 --budget-s 530 (415 s: lrs left out by the budget); call x lease_recipe x --only lrs,qk
# (carry .whl only: the shards stay in /tmp; 390 s). Ours of call w is call x's baseline. 187 s left.
# 2026-12-07 (late): 1,424 s of refused starts (each real try 90 s, one 180 s; after an H200 refusal a call with no
# kind asks for an H200 only, so an H100 needs `kind: nvidia-h100-x1` named), then one H100 call of 170 s: lease_install
# and the trace cache's GPU test (both cases died at torch 2.11's package.py:614: FlexAttention's guard, fixed since).
# Next: call 1 lease_small, the trace cache's GPU test (~2.5 min) and lease_warm --only ours,old
# --variant old:attn_vo_init=0,batch_lr_scales=,muon_qk_pairs=false; call 2 lease_full + lease_recipe y --only
# ours,old (same variant) --budget-s 500; call 3 the same at --seed-base 1 (the new defaults together, two seeds);
# with the GPU test passing, `lease_node_probe bench/cache_probe.yaml --set trainer.compile_trace_cache=true` (~6 min).
# Once the y/z rows are back (here): FineWeb's steps and the 8xH100 time for the new defaults, `bench/projection.py
# --recipe-json bench/results/recipe-<gpu>-issue22-y.json --run ours --log <its ours launch log> --base-run old
# --base-steps 1998 --tag issue22-y`. Then the schedule's length (no new graph, two per call): ours reaches the target
# at ~step 229-234 of 260 and ends 0.07 below it, so `--variant s230:steps=230 --variant s210:steps=210`.
# 2026-12-07 (night): loans paused for the session's first hour; then the corpus rebuilt here (rebuild.sh 5.5 min,
# make_jsonl --mb 320: 105,101 documents, xz -6 -T2 1.9 min: 81,725,016 bytes) and the wheels fetched again (11,
# typing_extensions included). Starts refused or held back from 21:45 to 22:49 (H200 and H100, each real try 90 s:
# 1,126 s in all), then one H100 for two calls: the trace cache's GPU test (116 s of wall; failed one step further,
# bench/NOTES.md) and, warm, torch 2.11's DefaultsSource read back plus the compiled-flex test with window_exact (37 s,
# 6 passed); given back at 402 s left; the next start (for the fixed test) refused, and 312 s cannot start another.
# No yardstick row: the combined row, its second seed and the projection are still the next lease's first calls.
# A review against the records' code (bench/NOTES.md)
# queued, after the schedule's length: the optimizer-only rows first, which trace ours' graph (two per call):
# `--variant alr:adam_embed_lr=1.04,adam_head_lr=0.0138,adam_scalar_lr=0.069 --variant mlr:muon_lr=0.04,
# muon_mlp_lr_scales=2,4`; then, each with its own cold compile in call 1's lease_warm: smear=true (its gate now on
# Adam), window_exact=true, the window stages with yarn=true,attn_scale=0.1, value_embed_gate=true (new input and
# optimizer), mudd=true,attn_input_layer=8, inject_after_attention=true (2026-12-08; with residual_scales=true too:
# the record's form). test_trainer_gpu.py's compiled-flex test now also runs window_exact:
# in call 1, `python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_trainer_trace_cache.py
# tests/unit/test_trainer_gpu.py -k "trace or compiled_flex"` in place of the trace-cache file alone.
# 2026-12-08: one refused H200 start (91 s), then one H100 for five calls (carry .whl only; the corpus was not rebuilt
# in time): the trace cache's GPU test (212 s: every load worked), `lease_node_probe bench/cache_probe.yaml --set
# trainer.compile_trace_cache=true` (334 s), the same probe off (367 s), the test again twice and its PROGRAM under
# TORCH_LOGS=dynamo (213, 70, 320 s: cut by the budget). compile_trace_cache is on by default since, with a folder per
# device and no save from a process that traced nothing: neither yet on a GPU. The plan above is unchanged; rebuild the
# corpus (rebuild.sh, make_jsonl, xz: ~9 min here) before the first start. The trace-cache file's two GPU cases now
# take ~6 min whole: in call 1 run `-k "cuda-True"` only (the trainer's default), and read compile_s, setup_s and
# trace_save_s off lease_warm's warm-up lines (where a warm seed's ~16 s before its first step go).
#
# .whl: pydantic, pydantic_core, annotated_types, typing_inspection, tenacity, pathspec, and rich with
# markdown_it_py, mdurl and pygments (one H100 machine had no rich), as cp312 manylinux wheels (the device README).
# Shards land in /tmp/rt/shards: the path recipe-nvidia-h200.json's reference curve names.

LEASE_RT=/tmp/rt
LEASE_CACHE=/tmp/speedrun/work/compile-cache   # cluster_configs/local-gpu.yaml's work_dir, one folder per key

lease_pieces() {   # CORPUS_XZ OUTDIR: split the corpus into pieces that each fit a call beside the tree
  mkdir -p "$2" && split -b 37700000 "$1" "$2/part." && ls -l "$2"/part.*
}

lease_install() {   # the wheels into /tmp/site; PYTHONPATH; `speedrun` as this interpreter's module
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  # not `pip install -e .`: the machine's `pip` may belong to another python than python3 (seen 2026-12-05)
  speedrun() { python3 -m orchestrator.cli "$@"; }
  mkdir -p $LEASE_RT
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
}

lease_small() {   # FIRST_PIECE: shards of its first 30,000 documents in /tmp/rt/small; the piece kept for call 2
  xz -dc "$1" 2>/dev/null | head -n 30000 > $LEASE_RT/small.jsonl
  speedrun data prepare --input $LEASE_RT/small.jsonl --out $LEASE_RT/small --encoding-file .rt/bpe --val-docs 5000 \
    | tail -1
  cp "$1" $LEASE_RT/
}

lease_full() {   # OTHER_PIECES...: the whole corpus (the first piece from call 1) as shards in /tmp/rt/shards
  [ -f $LEASE_RT/part.aa ] || { echo "no $LEASE_RT/part.aa: the machine of call 1 is gone"; return 3; }
  cat $LEASE_RT/part.aa "$@" | xz -dc > $LEASE_RT/docs.jsonl && wc -l < $LEASE_RT/docs.jsonl
  speedrun data prepare --input $LEASE_RT/docs.jsonl --out $LEASE_RT/shards --encoding-file .rt/bpe --val-docs 5000 \
    | tail -1
  python3 -c "import sys; sys.path.insert(0, 'bench'); from recipe import describe_data; from pathlib import Path; \
print('fingerprint', describe_data(Path('$LEASE_RT/shards'))['fingerprint'])"
}

lease_warm() {   # RECIPE_ARGS...: 4 steps of each run on the small shards, to fill the node's compile cache before
  # the full shards' call. No --reference-json here: recipe.py refuses a reference curve of another step count
  # (seen 2026-12-06: a warm-up given lease_recipe's flags ended at that check, rc 2, having compiled nothing)
  python3 bench/recipe.py --data $LEASE_RT/small --steps 4 --val-every 2 --val-tokens 262144 --tag warm --out "$OUT" \
    --work /tmp/yard/warm "$@" > "$OUT/warm.txt" 2>&1
  echo "warm rc $?"; grep -h "warm-up of" -r /tmp/yard/warm/stores 2>/dev/null | cut -c1-600
}

lease_recipe() {   # TAG RECIPE_ARGS...: bench/recipe.py on the full shards, its JSON and launch logs written
  # straight into $OUT: recipe.py rewrites the JSON after every run, so a call cut at its limit still brings back
  # every run that finished (a copy after the recipe would be lost with the cut; seen 2026-12-05)
  local tag=$1; shift
  mkdir -p "$OUT/logs-$tag"
  python3 bench/recipe.py --data $LEASE_RT/shards --steps 200 --val-every 25 \
    --reference-json bench/results/recipe-nvidia-h200.json --tag "$tag" --out "$OUT" --log-dir "$OUT/logs-$tag" \
    --work /tmp/yard/$tag "$@" > "$OUT/recipe-$tag.txt" 2>&1
  echo "recipe $tag rc $?"; tail -14 "$OUT/recipe-$tag.txt"
}

lease_cache_probe() {   # JOB N: N launches of JOB on this node, one store each; what each compiled, into $OUT
  local i s
  for i in $(seq 1 "$2"); do
    s=$(date +%s)
    speedrun launch "$1" --cluster cluster_configs/local-gpu.yaml --set cluster.gpus_per_node=1 \
      --store /tmp/probe/store$i > $OUT/probe-launch-$i.log 2>&1
    echo "launch $i: rc $? in $(( $(date +%s) - s )) s"
    (cd $LEASE_CACHE && find . -type f | sort) > /tmp/probe/list-$i.txt
    grep -h "warm-up of" -r /tmp/probe/store$i | cut -c1-400
  done
  lease_key_diff > $OUT/probe-key-diff.txt
  cut -c1-300 $OUT/probe-key-diff.txt | head -40
}

lease_node_probe() {   # JOB [LAUNCH_ARGS...]: three launches of JOB into one store: cold (node and store empty), again
  # on the same node, then as a fresh node (the node's compile cache removed, so the seed starts from what the store
  # saved); each launch's warm-up line and timings.json into $OUT/node-probe-N.txt
  rm -rf $LEASE_CACHE /tmp/nprobe
  lease_node_launch 1 "$@"
  lease_node_launch 2 "$@"
  rm -rf $LEASE_CACHE
  lease_node_launch 3 "$@"
}

lease_node_launch() {   # N JOB [LAUNCH_ARGS...]: one launch of lease_node_probe's, into its store
  local i=$1 s log; shift
  s=$(date +%s)
  speedrun launch "$@" --cluster cluster_configs/local-gpu.yaml --set cluster.gpus_per_node=1 \
    --store /tmp/nprobe/store > /tmp/nprobe-launch-$i.log 2>&1
  echo "launch $i: rc $? in $(( $(date +%s) - s )) s"
  log=$(ls -t $(find /tmp/nprobe/store -name train.log) | head -1)
  { echo "## launch $i ($*): $(( $(date +%s) - s )) s"; tail -8 /tmp/nprobe-launch-$i.log
    grep -h "warm-up of" "$log"; grep -h "val_loss" "$log" | tail -2; cat "$(dirname "$log")"/timings.json; echo
  } > $OUT/node-probe-$i.txt 2>&1
  grep -h "warm-up of" "$log" | cut -c1-700
}

lease_key_diff() {   # kernels compiled under two cache keys: how their metadata differ (what Triton keyed)
  (cd $LEASE_CACHE && find . -name '*.json' -path '*/triton/*' ! -name '__grp__*' | sort) \
    | awk -F/ '{print $NF, $0}' | sort | awk '{n[$1]++; p[$1]=p[$1] " " $2} END {for (k in n) if (n[k] > 1) print p[k]}' \
    | head -3 | while read -r a b _; do
        (cd $LEASE_CACHE && python3 -c "import json, sys; x, y = (json.load(open(f)) for f in sys.argv[1:3]); \
print(sys.argv[1], sys.argv[2]); [print(' ', k, x.get(k), '|', y.get(k)) for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]" "$a" "$b")
      done
}

lease_record28() {   # N LIMIT_MIN [fresh]: launch N of bench/record28.yaml (record-28's script, carried in
  # .rt/reference), its one seed stopped after LIMIT_MIN; `fresh` empties the node's compile caches first, so the
  # seed starts from what the store saved (a fresh node). The launch's end, the seed's step and validation lines
  # and its timings into $OUT/record28-N.txt
  local n=$1 s rc
  [ "$3" = fresh ] && rm -rf $LEASE_CACHE
  s=$(date +%s)
  speedrun launch bench/record28.yaml --cluster cluster_configs/local-gpu.yaml --set cluster.gpus_per_node=1 \
    --set seed_time_limit_min="$2" --store /tmp/r28/store > /tmp/r28-launch-$n.log 2>&1
  rc=$?
  {
    echo "## launch $n ($3): rc $rc in $(( $(date +%s) - s )) s"; tail -25 /tmp/r28-launch-$n.log
    local log; log=$(ls -t $(find /tmp/r28/store -name train.log) | head -1)
    echo "## $log"; grep -E "val_loss|^step:(1|2|10|11|50|100)/" "$log"; grep "^step:" "$log" | tail -2
    echo "## timings"; cat "$(dirname "$log")"/timings.json 2>/dev/null
    echo "## node compile cache: $(find $LEASE_CACHE -type f | wc -l) files"
  } > $OUT/record28-$n.txt 2>&1
  tail -12 $OUT/record28-$n.txt
}
