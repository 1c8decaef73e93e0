"""Causal attention over packed documents with a block sliding window: forward and backward in Triton.

The rule is trainer/attention.py's: query q sees key k when k <= q, both lie in the same document (no BOS
in (k, q]) and q // block_size - k // block_size < window. Documents are contiguous, so every query sees
one contiguous run of keys, [lo(q), q] with lo(q) = max(doc_start(q), (q // block_size - window + 1) *
block_size), and every key one contiguous run of queries, [k, hi(k)). The kernels walk exactly those runs
(in tiles), where FlexAttention walks a block mask of 128 x 128 tiles: no index lists, no tile computed
for a document that starts after it, and the mask applied only on the tiles at the ends of each run
(the middle tiles are wholly visible). Three kernels, FlashAttention-2 style: the forward (output and
log-sum-exp), dq (which also writes delta = rowsum(dO * O)), then dk and dv, each launched per sequence
over a grid of (position tiles, heads). Tiles of q, k, v, o and the gradients move through TMA descriptors
on each sequence's (T, heads * head_dim) matrix (Hopper's copy engine; rows past T read as zeros, stores
past T are dropped), so no tile of 64-bit addresses sits in registers: with pointer arithmetic the forward
spilled 650 bytes a thread, and 4-D descriptors with a one-head box compiled to spilling code too.

Not yet measured against FlexAttention on a GPU: bench/kernels.py has the rows; the trainer takes this
path with attention=triton.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel. Chosen without a GPU from the sm_90 compiler's report
# (bench/kernel_resources.py, triton 3.6 as on the GPU machines and 3.9): the largest tiles that keep every
# accumulator in registers, no local-memory spills (fwd 162-164 registers, dq 158-166, dk/dv 223-235; dk/dv
# at 32x128 with 4 warps spilled ~750-890 bytes a thread). Still to be timed and swept on the GPU
# (bench/kernels.py). The dk/dv kernel's BLOCK_N (keys) must be a multiple of its BLOCK_M (queries).
GPU_CONFIGS = {"fwd": (128, 64, 8, 3), "dq": (128, 64, 8, 3), "dkdv": (32, 128, 8, 2)}
INTERPRET_CONFIGS = {"fwd": (32, 16, 4, 1), "dq": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1)}


@triton.jit
def _first_key(rows, T, doc_start_ptr, window, BS: tl.constexpr):
    """lo(q): the first key each query row sees (the caller masks rows past T)."""
    ds = tl.load(doc_start_ptr + rows, mask=rows < T, other=0)
    return tl.maximum(ds, (rows // BS - window + 1) * BS)


@triton.jit
def _last_query(cols, T, doc_end_ptr, window, BS: tl.constexpr):
    """hi(k): one past the last query that sees each key."""
    de = tl.load(doc_end_ptr + cols, mask=cols < T, other=0)
    return tl.minimum(tl.minimum(de, (cols // BS + window) * BS), T)


@triton.jit
def _tile(desc, h, start, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Positions [start, start + ROWS) of head h from a (T, H * D) descriptor, as (ROWS, D); the copy engine
    zero-fills positions past T."""
    t = desc.load([start, h * HEAD_DIM])
    if UPCAST:   # the interpreter's dot multiplies bf16 as raw bits; compiled code never takes this
        t = t.to(tl.float32)
    return t


@triton.jit
def _fwd_run(acc, l_i, m_i, q, k_desc, v_desc, h, rows, lo, start, end, qk_scale, MASKED: tl.constexpr,
             BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over the key tiles [start, end); MASKED on the run's end tiles only."""
    for s in range(start, end, BLOCK_N):
        k = _tile(k_desc, h, s, BLOCK_N, HEAD_DIM, UPCAST)
        v = _tile(v_desc, h, s, BLOCK_N, HEAD_DIM, UPCAST)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            cols = s + tl.arange(0, BLOCK_N)
            qk = tl.where((cols[None, :] <= rows[:, None]) & (cols[None, :] >= lo[:, None]), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_runs(rows, lo, q0, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A query tile's key run in three parts: [start, mid) masked (the run's first keys, which not every row
    sees), [mid, q0) unmasked (every row sees them), [q0, end) masked (the causal diagonal)."""
    valid = rows < T
    start = tl.min(tl.where(valid, lo, T)) // BLOCK_N * BLOCK_N
    mid = tl.minimum(tl.cdiv(tl.max(tl.where(valid, lo, 0)), BLOCK_N) * BLOCK_N, q0)
    return start, mid, tl.minimum(q0 + BLOCK_M, T)


@triton.jit
def _fwd_kernel(q_desc, k_desc, v_desc, o_desc, lse_ptr, doc_start_ptr, window_ptr, T, qk_scale,
                BS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                UPCAST: tl.constexpr):
    q0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    rows = q0 + tl.arange(0, BLOCK_M)
    lo = _first_key(rows, T, doc_start_ptr, tl.load(window_ptr).to(tl.int32), BS)
    q = _tile(q_desc, h, q0, BLOCK_M, HEAD_DIM, UPCAST)
    start, mid, end = _query_runs(rows, lo, q0, T, BLOCK_M, BLOCK_N)
    # a finite start for the running max: a row with no visible key in a masked tile keeps exp2(-inf) = 0
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, k_desc, v_desc, h, rows, lo, start, mid, qk_scale, True,
                             BLOCK_N, HEAD_DIM, UPCAST)
    acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, k_desc, v_desc, h, rows, lo, mid, q0, qk_scale, False,
                             BLOCK_N, HEAD_DIM, UPCAST)
    acc, l_i, m_i = _fwd_run(acc, l_i, m_i, q, k_desc, v_desc, h, rows, lo, q0, end, qk_scale, True,
                             BLOCK_N, HEAD_DIM, UPCAST)
    inside = rows < T
    l_i = tl.where(inside, l_i, 1.0)   # rows past T may see no key at all: keep their (unstored) math finite
    out = acc / l_i[:, None]
    o_desc.store([q0, h * HEAD_DIM], out.to(o_desc.dtype))
    tl.store(lse_ptr + h * T + rows, m_i + tl.math.log2(l_i), mask=inside)   # base 2


@triton.jit
def _dq_run(dq, q, do, lse, delta, k_desc, v_desc, h, rows, lo, start, end, qk_scale, MASKED: tl.constexpr,
            BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    for s in range(start, end, BLOCK_N):
        k = _tile(k_desc, h, s, BLOCK_N, HEAD_DIM, UPCAST)
        v = _tile(v_desc, h, s, BLOCK_N, HEAD_DIM, UPCAST)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if MASKED:
            cols = s + tl.arange(0, BLOCK_N)
            p = tl.where((cols[None, :] <= rows[:, None]) & (cols[None, :] >= lo[:, None]), p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _dq_kernel(q_desc, k_desc, v_desc, o_desc, do_desc, dq_desc, lse_ptr, delta_ptr, doc_start_ptr, window_ptr,
               T, sm_scale, qk_scale, BS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """dq for one query tile. Also writes delta = rowsum(dO * O), which dk/dv need."""
    q0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    rows = q0 + tl.arange(0, BLOCK_M)
    inside = rows < T
    lo = _first_key(rows, T, doc_start_ptr, tl.load(window_ptr).to(tl.int32), BS)
    q = _tile(q_desc, h, q0, BLOCK_M, HEAD_DIM, UPCAST)
    do = _tile(do_desc, h, q0, BLOCK_M, HEAD_DIM, UPCAST)
    o = _tile(o_desc, h, q0, BLOCK_M, HEAD_DIM, UPCAST)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(delta_ptr + h * T + rows, delta, mask=inside)
    lse = tl.load(lse_ptr + h * T + rows, mask=inside, other=0.0)
    start, mid, end = _query_runs(rows, lo, q0, T, BLOCK_M, BLOCK_N)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    dq = _dq_run(dq, q, do, lse, delta, k_desc, v_desc, h, rows, lo, start, mid, qk_scale, True, BLOCK_N,
                 HEAD_DIM, UPCAST)
    dq = _dq_run(dq, q, do, lse, delta, k_desc, v_desc, h, rows, lo, mid, q0, qk_scale, False, BLOCK_N,
                 HEAD_DIM, UPCAST)
    dq = _dq_run(dq, q, do, lse, delta, k_desc, v_desc, h, rows, lo, q0, end, qk_scale, True, BLOCK_N,
                 HEAD_DIM, UPCAST)
    dq_desc.store([q0, h * HEAD_DIM], (dq * sm_scale).to(dq_desc.dtype))


@triton.jit
def _dkdv_run(dk, dv, k, v, q_desc, do_desc, lse_base, delta_base, h, cols, hi, start, end, T, qk_scale,
              MASKED: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """dk, dv of one key tile over the query tiles [start, end): transposed products, keys on the rows."""
    for s in range(start, end, BLOCK_M):
        rows = s + tl.arange(0, BLOCK_M)
        q = _tile(q_desc, h, s, BLOCK_M, HEAD_DIM, UPCAST)
        do = _tile(do_desc, h, s, BLOCK_M, HEAD_DIM, UPCAST)
        lse = tl.load(lse_base + rows, mask=rows < T, other=float("inf"))   # rows past T: p = 0
        delta = tl.load(delta_base + rows, mask=rows < T, other=0.0)
        pt = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        if MASKED:
            pt = tl.where((rows[None, :] >= cols[:, None]) & (rows[None, :] < hi[:, None]), pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dst = pt * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _dkdv_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, lse_ptr, delta_ptr, doc_end_ptr, window_ptr,
                 T, sm_scale, qk_scale, BS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """dk, dv for one tile of BLOCK_N keys. Its query run: [k0, k0 + BLOCK_N) masked (the diagonal), then
    the tiles every key's queries include, unmasked, then the run's last tiles, masked."""
    k0 = tl.program_id(0) * BLOCK_N
    h = tl.program_id(1)
    cols = k0 + tl.arange(0, BLOCK_N)
    inside = cols < T
    hi = _last_query(cols, T, doc_end_ptr, tl.load(window_ptr).to(tl.int32), BS)
    k = _tile(k_desc, h, k0, BLOCK_N, HEAD_DIM, UPCAST)
    v = _tile(v_desc, h, k0, BLOCK_N, HEAD_DIM, UPCAST)
    lse_base, delta_base = lse_ptr + h * T, delta_ptr + h * T
    diag_end = tl.minimum(k0 + BLOCK_N, T)
    mid = tl.maximum(tl.min(tl.where(inside, hi, T)) // BLOCK_M * BLOCK_M, diag_end)
    end = tl.maximum(tl.max(tl.where(inside, hi, 0)), mid)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dk, dv = _dkdv_run(dk, dv, k, v, q_desc, do_desc, lse_base, delta_base, h, cols, hi, k0, diag_end, T,
                       qk_scale, True, BLOCK_M, HEAD_DIM, UPCAST)
    dk, dv = _dkdv_run(dk, dv, k, v, q_desc, do_desc, lse_base, delta_base, h, cols, hi, diag_end, mid, T,
                       qk_scale, False, BLOCK_M, HEAD_DIM, UPCAST)
    dk, dv = _dkdv_run(dk, dv, k, v, q_desc, do_desc, lse_base, delta_base, h, cols, hi, mid, end, T,
                       qk_scale, True, BLOCK_M, HEAD_DIM, UPCAST)
    dk_desc.store([k0, h * HEAD_DIM], (dk * sm_scale).to(dk_desc.dtype))
    dv_desc.store([k0, h * HEAD_DIM], dv.to(dv_desc.dtype))


# --------------------------------------------------------------------------------------- the op

def _configs() -> dict:
    return INTERPRET_CONFIGS if INTERPRET else GPU_CONFIGS


def _rows(t: torch.Tensor) -> torch.Tensor:
    """One sequence's (T, H, D) tensor as the (T, H * D) matrix the copy engine reads tiles of (rows of
    positions, one head's D columns): heads packed along a row, a unit stride along head_dim, 16-byte
    aligned base and rows. What the model hands over already is (q, k and v are views of (B, T, H, D)
    tensors); anything else is copied first."""
    T, H, D = t.shape
    size = t.element_size()
    if not (t.stride(2) == 1 and t.stride(1) == D and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0
            and t.stride(0) >= H * D):
        t = t.contiguous()
    return t.as_strided((T, H * D), (t.stride(0), 1))


def _desc(t: torch.Tensor, rows: int, head_dim: int) -> TensorDescriptor:
    """A (T, H * D) matrix's descriptor for tiles of `rows` positions of one head."""
    return TensorDescriptor.from_tensor(t, [rows, head_dim])


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: torch.Tensor, doc_end: torch.Tensor,
           window: torch.Tensor) -> None:
    B, H, T, D = q.shape
    if k.shape != q.shape or v.shape != q.shape or len({q.dtype, k.dtype, v.dtype}) != 1:
        raise ValueError(f"doc_attention: q, k, v must share one (B, H, T, D) shape and dtype (got {tuple(q.shape)} "
                         f"{q.dtype}, {tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype})")
    if D & (D - 1) or D < 16:
        raise ValueError(f"doc_attention: head_dim must be a power of two >= 16 (got {D})")
    for name, t in (("doc_start", doc_start), ("doc_end", doc_end)):
        if t.shape != (B, T) or t.dtype != torch.int32 or not t.is_contiguous():
            raise ValueError(f"doc_attention: {name} must be a contiguous int32 (B, T) = {(B, T)} tensor "
                             f"(got {tuple(t.shape)} {t.dtype})")
    if window.numel() != 1 or window.dtype.is_floating_point:
        raise ValueError("doc_attention: window must be a one-element integer tensor (blocks)")


@torch.library.custom_op("speedrun::doc_attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: torch.Tensor,
                   doc_end: torch.Tensor, window: torch.Tensor, block_size: int,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, T, H, D) and the base-2 log-sum-exp (B, H, T) fp32. doc_end is unused here: it rides along so
    the backward finds it saved."""
    _check(q, k, v, doc_start, doc_end, window)
    B, H, T, D = q.shape
    o = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    bm, bn, warps, stages = _configs()["fwd"]
    for b in range(B) if T else ():   # one sequence a launch: a tile past T must not reach the next one
        _fwd_kernel[(triton.cdiv(T, bm), H)](
            _desc(_rows(q[b].transpose(0, 1)), bm, D), _desc(_rows(k[b].transpose(0, 1)), bn, D),
            _desc(_rows(v[b].transpose(0, 1)), bn, D), _desc(o[b].view(T, H * D), bm, D), lse[b], doc_start[b], window, T,
            scale * LOG2E, BS=block_size, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, UPCAST=INTERPRET, num_warps=warps,
            num_stages=stages)
    return o, lse


@_attention_fwd.register_fake
def _(q, k, v, doc_start, doc_end, window, block_size, scale):
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("speedrun::doc_attention_bwd", mutates_args=())
def _attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, doc_start: torch.Tensor, doc_end: torch.Tensor, window: torch.Tensor,
                   block_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, each (B, H, T, D) as a view of a (B, T, H, D) tensor; do and o are (B, T, H, D)."""
    B, H, T, D = q.shape
    dq, dk, dv = (torch.empty((B, T, H, D), dtype=q.dtype, device=q.device) for _ in range(3))
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    cfg = _configs()
    for b in range(B) if T else ():
        qb, kb, vb = (_rows(t[b].transpose(0, 1)) for t in (q, k, v))
        ob, dob = _rows(o[b]), _rows(do[b])
        dqb, dkb, dvb = (t[b].view(T, H * D) for t in (dq, dk, dv))   # outputs: written in place, never copied
        bm, bn, warps, stages = cfg["dq"]
        _dq_kernel[(triton.cdiv(T, bm), H)](
            _desc(qb, bm, D), _desc(kb, bn, D), _desc(vb, bn, D), _desc(ob, bm, D), _desc(dob, bm, D),
            _desc(dqb, bm, D), lse[b], delta[b], doc_start[b], window, T, scale, scale * LOG2E, BS=block_size,
            HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, UPCAST=INTERPRET, num_warps=warps, num_stages=stages)
        bm, bn, warps, stages = cfg["dkdv"]
        _dkdv_kernel[(triton.cdiv(T, bn), H)](
            _desc(qb, bm, D), _desc(kb, bn, D), _desc(vb, bn, D), _desc(dob, bm, D), _desc(dkb, bn, D),
            _desc(dvb, bn, D), lse[b], delta[b], doc_end[b], window, T, scale, scale * LOG2E, BS=block_size,
            HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, UPCAST=INTERPRET, num_warps=warps, num_stages=stages)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, doc_start, doc_end, window, block_size, scale):
    B, H, T, D = q.shape
    return tuple(q.new_empty((B, T, H, D)).transpose(1, 2) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, doc_start, doc_end, window, block_size, scale = inputs
    ctx.block_size, ctx.scale = block_size, scale
    ctx.save_for_backward(q, k, v, output[0], output[1], doc_start, doc_end, window)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, doc_start, doc_end, window = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(do, q, k, v, o, lse, doc_start, doc_end, window, ctx.block_size, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def doc_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: torch.Tensor,
                  doc_end: torch.Tensor, window: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """softmax(scale q k^T) v under the document + block-window rule, for (B, H, T, D) q, k, v in any strides
    with a unit last one. doc_start[b, t] / doc_end[b, t]: the first position of t's document and one past
    its last (int32); window: the window in blocks of block_size, a one-element tensor (a growing window
    never recompiles). Returns (B, H, T, D), a view of a (B, T, H, D) tensor (what the output projection
    reads)."""
    return _attention_fwd(q, k, v, doc_start, doc_end, window, block_size, scale)[0].transpose(1, 2)
