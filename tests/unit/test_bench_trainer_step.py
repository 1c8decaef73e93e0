"""bench/trainer_step.py's pure parts: its reading of a profile (where the GPU sat idle, what the host was
doing then) and how a baseline checkout gets a compile cache of its own."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from trainer_step import cache_dir, code_hash, host_during, idle_gaps, kernel_diff, summarize_profile  # noqa: E402


def test_idle_gaps_are_the_holes_in_the_union_of_kernel_intervals():
    # b overlaps a and ends inside it (no hole between them); c starts 5 us after a ends; d 20 us after c
    kernels = [(30.0, 40.0, "c"), (0.0, 25.0, "a"), (10.0, 20.0, "b"), (60.0, 61.0, "d")]
    busy, span, gaps = idle_gaps(kernels)
    assert busy == 25 + 10 + 1
    assert span == 61
    assert gaps == [(25.0, 30.0, "a", "c"), (40.0, 60.0, "c", "d")]


def test_idle_gaps_of_no_kernels():
    assert idle_gaps([]) == (0.0, 0.0, [])


def test_host_op_is_the_innermost_one_spanning_the_hole():
    host = [(0.0, 100.0, "CompiledFunction"), (20.0, 60.0, "speedrun::mlp_relu2_fwd"),
            (30.0, 35.0, "aten::empty"), (38.0, 41.0, "cudaLaunchKernel")]
    assert host_during(25.0, 50.0, host) == "speedrun::mlp_relu2_fwd"
    assert host_during(31.0, 34.0, host) == "aten::empty"
    assert host_during(10.0, 90.0, host) == "CompiledFunction"


def test_host_op_covering_most_of_the_hole_when_none_spans_it():
    host = [(0.0, 12.0, "aten::copy_"), (14.0, 30.0, "aten::item")]
    assert host_during(10.0, 20.0, host) == "aten::item"
    assert host_during(40.0, 50.0, host) == ""


def test_profile_summary_per_step_figures_and_the_widest_holes():
    # two steps of kernels: holes of 5 us (a->b), 50 us (b->c) and 200 us (c->a of step 2), per the buckets
    kernels = [(0.0, 100.0, "a"), (105.0, 205.0, "b"), (255.0, 300.0, "c"), (500.0, 600.0, "a"), (605.0, 705.0, "b")]
    traced = [(0.0, 10.0, "a"), (40.0, 50.0, "mlp")]
    host = [(0.0, 60.0, "step [thread 1]"), (5.0, 41.0, "TensorDescriptor [thread 1]")]
    totals = [("a", 200.0, 2), ("b", 200.0, 2), ("c", 45.0, 1), ("cpu only", 0.0, 4)]
    out = summarize_profile(totals, kernels, traced, host, n=2)
    assert [r["name"] for r in out["kernels"]] == ["a", "b", "c"]
    assert out["kernels"][0] == dict(name="a", ms_per_step=0.1, calls_per_step=1.0)
    assert out["kernel_ms_per_step"] == (200 + 200 + 45) / 1000 / 2
    assert out["gpu_busy_ms_per_step"] == 445 / 1000 / 2 and out["gpu_span_ms_per_step"] == 705 / 1000 / 2
    assert out["idle_ms_per_step_by_gap"] == {"under_10us": 10 / 2000, "10us_to_100us": 50 / 2000,
                                               "over_100us": 200 / 2000}
    assert out["idle_gaps_per_step"] == 2
    assert [g["us"] for g in out["widest_idle_gaps"]] == [200.0, 50.0, 5.0, 5.0]
    assert out["widest_idle_gaps"][0] == dict(us=200.0, after="c", before="a")
    assert out["widest_idle_gaps_host_traced"] == [dict(us=30.0, before="mlp", host="TensorDescriptor [thread 1]")]


def test_kernel_diff_orders_by_the_change_and_counts_a_missing_kernel_as_zero():
    before = [dict(name="flex", ms_per_step=70.0), dict(name="norm_fwd", ms_per_step=13.0),
              dict(name="mlp", ms_per_step=61.0)]
    after = [dict(name="flex", ms_per_step=70.5), dict(name="attn_prep_fwd", ms_per_step=9.0),
             dict(name="mlp", ms_per_step=61.0)]
    assert kernel_diff(before, after) == [("norm_fwd", 13.0, 0.0), ("attn_prep_fwd", 0.0, 9.0), ("flex", 70.0, 70.5),
                                          ("mlp", 61.0, 61.0)]
    assert kernel_diff(before, after, top=1) == [("norm_fwd", 13.0, 0.0)]


def _tree(root: Path, files: dict) -> Path:
    for name, text in files.items():
        (root / "trainer" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "trainer" / name).write_text(text)
    return root


def test_a_baseline_checkout_compiles_into_a_cache_of_its_own(tmp_path):
    a = _tree(tmp_path / "a", {"train.py": "x = 1\n", "kernels/k.py": "y = 2\n"})
    same = _tree(tmp_path / "same", {"train.py": "x = 1\n", "kernels/k.py": "y = 2\n"})
    edited = _tree(tmp_path / "edited", {"train.py": "x = 1\n", "kernels/k.py": "y = 3\n"})
    moved = _tree(tmp_path / "moved", {"train.py": "x = 1\n", "kernels/j.py": "y = 2\n"})
    assert code_hash(a) == code_hash(same)
    assert len({code_hash(a), code_hash(edited), code_hash(moved)}) == 3
    assert cache_dir("NVIDIA H200", "2.11.0", a) != cache_dir("NVIDIA H200", "2.11.0", edited)
    assert cache_dir("NVIDIA H200", "2.11.0", a).name.startswith(code_hash(a) + "-torch2.11.0-NVIDIA_H200")


def test_a_baseline_that_is_no_checkout_is_one_sentence_and_exit_2(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "bench" / "trainer_step.py"), "--baseline", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == (f"--baseline {tmp_path}: no trainer/train.py there; give another checkout of "
                                  "this repo (git worktree add DIR REV)")


def test_attention_flops_count_a_paired_layer_as_half_the_heads_over_twice_the_positions():
    import numpy as np

    from trainer.data import BOS
    from trainer.fixtures import tiny_config
    from trainer_step import attention_flops

    T = 256   # one document, a window wider than it: every position sees all before it
    seq = np.full(T + 1, 5)
    seq[0] = BOS
    per_key = 3 * 4 * 4 * 16   # forward + backward, QK^T and PV, heads x head_dim
    cfg = dict(num_layers=4, num_heads=4, head_dim=16)
    plain = attention_flops(tiny_config(**cfg), [seq], window=8)
    paired = attention_flops(tiny_config(**cfg, paired_head_layers="1"), [seq], window=8)
    assert plain == per_key * 4 * T * (T + 1) / 2
    # the short layer's T(T+1)/2 keys become 2T(2T+1)/2 positions' keys over half the heads
    assert paired - plain == per_key * (2 * T * (2 * T + 1) / 2 / 2 - T * (T + 1) / 2)
