"""The tile configurations the trainer runs compile for Hopper (sm_90) and keep their accumulators in registers.

bench/kernel_resources.py --check compiles them here without a GPU (Triton's own ptxas and cuobjdump), in a
process of its own since the tests run Triton as an interpreter. A spill to local memory or a matrix product
that misses the wgmma instructions is a slow kernel before anyone times it; this catches a tile change, or a
Triton upgrade, that causes either.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
triton = pytest.importorskip("triton")
if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
    pytest.skip("Triton's NVIDIA backend tools (ptxas, cuobjdump) are not installed", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]


def resources(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(REPO / "bench" / "kernel_resources.py"), "--out", str(tmp_path), *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("family", ["linear+relu^2 forward", "linear+relu^2 backward", "softcap CE", "attn_prep"])
def test_default_tiles_compile_without_spills_and_use_wgmma(tmp_path, family):
    run = resources(tmp_path, "--check", "--only", family)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert family in run.stdout


def test_check_fails_on_a_spilling_tile(tmp_path):
    # the bf16 forward at 256x256 tiles with 4 warps holds a 256x256 fp32 accumulator in 128 threads, 512
    # registers each, and must spill: made the default, --check must say so
    patch = ("import sys; sys.argv = sys.argv[:1] + sys.argv[2:]; sys.path.insert(0, {repo!r}); "
             "from trainer.kernels import linear_relu2 as lr; "
             "lr.GPU_CONFIGS[(False, False, False)] = (256, 256, 64, 8, 4, 3, False, False); "
             "sys.path.insert(0, {bench!r}); import kernel_resources; sys.exit(kernel_resources.main())")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", patch.format(repo=str(REPO), bench=str(REPO / "bench")), "-",
                          "--check", "--only", "linear+relu^2 forward", "--out", str(tmp_path)],
                         capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert "linear+relu^2 forward" in run.stderr and "spills" in run.stderr
