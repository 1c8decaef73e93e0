"""Compile the trainer's Triton kernels for Hopper (sm_90) on this machine, no GPU needed, and report what the
compiler made of each tile configuration: registers per thread, local-memory spills (stack bytes and the
LDL/STL instructions that move them), shared memory, and whether the matrix products became wgmma
(HGMMA, or QGMMA for FP8, in the SASS). A spilling configuration is slow before it is timed, so this prunes a sweep before
any device time is spent on it.

    python bench/kernel_resources.py [--only SUBSTRING] [--sweep] [--check] [--out bench/results]

Without --sweep only the configurations the trainer runs are compiled; --sweep adds the alternatives the
GPU benchmark (bench/kernels.py) times. --check exits 1 when a configuration the trainer runs fails to
compile, spills, misses wgmma or wants more shared memory than an H100 block has (tests/unit run it). Uses the ptxas and cuobjdump that ship with Triton's NVIDIA
backend. Writes bench/results/kernel_resources-sm90-triton<version>.json. The GPU machines run an older Triton (3.6)
than this one may, and registers differ between releases by a few (enough to tip a tile into spilling): to
see what they will compile, install that release beside the project's and put it first,

    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36 python bench/kernel_resources.py --sweep
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Build:
    name: str
    kernel: object                 # a @triton.jit function
    signature: dict                # argument name -> Triton type; omitted arguments are i32
    constexprs: dict
    warps: int
    stages: int
    default: bool = True           # what the trainer runs (else: a sweep alternative)
    matmul: bool = True            # its products must become wgmma (a kernel without tl.dot: False)
    aligned: tuple = ()            # arguments a launch passes as multiples of 16 (pointers: 16-byte aligned),
                                   # which Triton's launcher tells the compiler, so loads and stores widen
    resources: dict = field(default_factory=dict)


def compile_sm90(b: Build) -> dict:
    """Compile one build for sm_90 and read its resource use off the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    sig = {n: ("constexpr" if n in b.constexprs else b.signature.get(n, "i32")) for n in b.kernel.arg_names}
    try:
        attrs = {(b.kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in b.aligned}
        k = triton_compile(ASTSource(fn=b.kernel, signature=sig, constexprs=b.constexprs, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": b.warps, "num_stages": b.stages})
    except Exception as e:   # noqa: BLE001 - a configuration that does not compile is a result, not a crash
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        return {"error": f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:200]}"}
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool), "--dump-sass", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    return {"registers": int(regs.group(1)) if regs else None, "stack_bytes": int(stack.group(1)) if stack else None,
            "shared_bytes": k.metadata.shared, "spill_loads": len(re.findall(r"\bLDL\b", sass)),
            "spill_stores": len(re.findall(r"\bSTL\b", sass)), "wgmma": len(re.findall(r"\b[HQ]GMMA\b", sass)),
            "mma": len(re.findall(r"\bHMMA\b", sass)), "mufu": len(re.findall(r"\bMUFU\.", sass))}


def fits_hopper(b: Build) -> bool:
    """Compiled, no local-memory spills, wgmma for the matrix products, and shared memory one H100 block has."""
    r = b.resources
    return ("error" not in r and r["stack_bytes"] == 0 and r["spill_loads"] == 0 and (r["wgmma"] > 0 or not b.matmul)
            and r["shared_bytes"] <= 227 * 1024)


def _desc(dtype: str, *block) -> str:
    return f"tensordesc<{dtype}[{','.join(map(str, block))}]>"


def linear_relu2_builds() -> list[Build]:
    """The trainer's tiles, and (sweep) the FP8 alternatives that bench/tile_sweep.py times."""
    from tile_sweep import CANDIDATES
    from trainer.kernels import linear_relu2 as lr

    out = []
    for key, cfg in lr.GPU_CONFIGS.items():
        out.append(_linear_relu2_build(lr, key, lr.Tiles(*cfg), default=True))
    for kind, candidates in CANDIDATES.items():   # bench/tile_sweep.py's, the FP8 kernels with both outputs
        for cfg in candidates:
            out.append(_linear_relu2_build(lr, (kind == "backward", True, True), lr.Tiles(*cfg), default=False))
    return out


def _linear_relu2_build(lr, key, cfg, default: bool) -> Build:
    backward, fp8, out8 = key
    bm, bn, bk, group, warps, stages, split, ws, h_early, per_sm = cfg
    sub_n = bn // 2 if split else bn
    a_type = ("fp8e5" if backward else "fp8e4nv") if fp8 else "bf16"
    sig = {"a_desc": _desc(a_type, bm, bk), "b_desc": _desc("fp8e4nv" if fp8 else "bf16", bn, bk),
           "c_desc": _desc("bf16", bm, sub_n), "scale_ptr": "*fp32" if fp8 else "*bf16"}
    consts = {"K": 768, "BACKWARD": backward, "SCALED": fp8, "OUT8": out8, "BLOCK_M": bm, "BLOCK_N": bn,
              "BLOCK_K": bk, "GROUP_M": group, "SPLIT": split, "H_EARLY": h_early, "WARP_SPECIALIZE": ws,
              "PROGRAMS": 132 * per_sm, "INTERPRET": False, "TILES_PER_PROGRAM": 35}
    if backward:
        sig["h_desc"] = _desc("bf16", bm, sub_n)
    else:
        consts["h_desc"] = None
    if out8:
        sig["o8_desc"] = _desc("fp8e5" if backward else "fp8e4nv", bm, sub_n)
    else:
        consts["o8_desc"] = None
    name = f"linear+relu^2 {'backward' if backward else 'forward'}{', FP8' if fp8 else ''}{', FP8 out' if out8 else ''}"
    if not default:
        name += (f" {bm}x{bn}x{bk}/{warps}w/{stages}s{' split' if split else ''}{' ws' if ws else ''}"
                 f" h{h_early} x{per_sm}")
    return Build(name, lr._matmul_relu2_kernel, sig, consts, warps, stages, default=default)


def softcap_ce_builds() -> list[Build]:
    """The loss kernel at the lm head's shape, writing the FP8 gradient as the trainer does, with one target a
    row and with multi-token prediction's three weighted ones. Its MUFU count (the special-function unit: tanh,
    exp2, log, reciprocals) is what it is bound by besides memory."""
    from trainer.kernels import softcap_ce as ce

    sig = {"logits_ptr": "*bf16", "targets_ptr": "*i64", "weights_ptr": "*fp32", "loss_ptr": "*fp32",
           "grad_ptr": "*fp8e5", "cap": "fp32", "grad_mult": "fp32", "stride_m": "i32", "grad_stride_m": "i32"}
    out = []
    configs = [ce.GPU_CONFIG, (8, 128, 4), (8, 256, 8), (4, 256, 8), (4, 512, 4), (2, 512, 4), (4, 128, 4)]
    for (bm, bn, warps), k in [(cfg, 1) for cfg in configs] + [(ce.GPU_CONFIG, 3)]:
        name = f"softcap CE {bm}x{bn}, {warps} warps" + (f", {k} weighted targets" if k > 1 else "")
        out.append(Build(name, ce._softcap_ce_kernel, sig,
                         {"N": 50257, "N_TOTAL": 50304, "FAST_TANH": True, "BLOCK_M": bm, "BLOCK_N": bn,
                          "EVEN_M": True, "WRITE_GRAD": True, "K": k, "WEIGHTED": k > 1}, warps, 3,
                         default=(bm, bn, warps) == ce.GPU_CONFIG, matmul=False,
                         aligned=("logits_ptr", "targets_ptr", "weights_ptr", "loss_ptr", "grad_ptr", "M", "stride_m",
                                  "grad_stride_m")))
    return out


def attn_prep_builds() -> list[Build]:
    """The attention's q/k norm + rotary + value mix, both ways, at the trainer's heads (6 x 128), with a value
    embedding (the layers without one compile a smaller kernel)."""
    from trainer.kernels import attn_prep as ap

    consts = {"H": 6, "D": 128, "HAS_VE": True, "BLOCK_T": ap.BLOCK_T, "EPS": ap.EPS}
    bf16 = "*bf16"
    fwd = {n: bf16 for n in ("qkv", "ve", "cos", "sin", "q", "k", "v")} | {"lambdas": "*fp32"}
    bwd = {n: bf16 for n in ("dq", "dk", "dv", "qkv", "ve", "cos", "sin", "dqkv", "dve")} | {
        "lambdas": "*fp32", "dlam": "*fp32"}
    return [Build("attn_prep forward", ap._attn_prep_fwd_kernel, fwd, consts, ap.WARPS, 1, matmul=False,
                  aligned=tuple(fwd)),
            Build("attn_prep backward", ap._attn_prep_bwd_kernel, bwd, consts, ap.WARPS, 1, matmul=False,
                  aligned=tuple(bwd) + ("dq_st", "dq_sh", "dk_st", "dk_sh", "dv_st", "dv_sh"))]


FAMILIES = (linear_relu2_builds, softcap_ce_builds, attn_prep_builds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="compile the builds whose name contains this")
    ap.add_argument("--sweep", action="store_true", help="also the sweep alternatives, not only the defaults")
    ap.add_argument("--check", action="store_true", help="exit 1 if a default configuration spills or misses wgmma")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench/kernel_resources.py compiles for the GPU: run it without TRITON_INTERPRET=1.", file=sys.stderr)
        return 2
    import triton
    from rich.console import Console
    from rich.table import Table

    builds = [b for family in FAMILIES for b in family() if args.only in b.name and (args.sweep or b.default)]
    table = Table(title=f"sm_90 compile of the trainer's Triton kernels (triton {triton.__version__}, no GPU)")
    for col in ("kernel and tiles", "registers", "spilled bytes", "LDL/STL", "shared KB", "wgmma", "MUFU"):
        table.add_column(col, justify="left" if col == "kernel and tiles" else "right")
    for b in builds:
        b.resources = compile_sm90(b)
        r = b.resources
        label = b.name + ("" if b.default else " (sweep)")
        if "error" in r:
            table.add_row(label, "-", "-", "-", "-", "-", r["error"])
            continue
        table.add_row(label, str(r["registers"]), str(r["stack_bytes"]), f"{r['spill_loads']}/{r['spill_stores']}",
                      f"{r['shared_bytes'] / 1024:.0f}", str(r["wgmma"]), str(r["mufu"]))
    Console(width=120).print(table)
    path = Path(args.out) / f"kernel_resources-sm90-triton{triton.__version__}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [dict(name=b.name, default=b.default, warps=b.warps, stages=b.stages, **b.resources) for b in builds]
    path.write_text(json.dumps(dict(target="sm_90 (compiled on a CPU-only machine)", triton=triton.__version__,
                                    rows=rows), indent=2))
    bad = [b.name for b in builds if b.default and not fits_hopper(b)]
    if args.check and bad:
        print(f"kernel_resources: {', '.join(bad)}: spills, misses wgmma or does not compile; choose another "
              "tile in the kernel's GPU config (bench/kernel_resources.py --sweep lists candidates).", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
