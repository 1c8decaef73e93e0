"""bench/trainer_step.py's reading of a profile: where the GPU sat idle, and what the host was doing then."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from trainer_step import host_during, idle_gaps  # noqa: E402


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
