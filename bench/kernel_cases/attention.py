"""Attention: FlexAttention's kernel options, and the Triton document attention against FlexAttention
(trainer/attention.py, trainer/kernels/doc_attention.py)."""
from __future__ import annotations

from kernel_cases import ACCUM, LAYERS, TOKENS, case


# FlexAttention's own kernel options, each against its defaults
FLEX_OPTIONS = {
    "safe rows + prescale": dict(ROWS_GUARANTEED_SAFE=True, PRESCALE_QK=True),
    "TMA": dict(USE_TMA=True),
    "safe rows + prescale + TMA": dict(ROWS_GUARANTEED_SAFE=True, PRESCALE_QK=True, USE_TMA=True),
    "fwd 128x128, 2 stages": dict(BLOCK_M=128, BLOCK_N=128, num_stages=2),
    "bwd 32/128/128/32": dict(bwd_BLOCK_M1=32, bwd_BLOCK_N1=128, bwd_BLOCK_M2=128, bwd_BLOCK_N2=32),
}


def _attention_inputs(window: int):
    """q, k, v, dy at the record's shapes over packed documents of FineWeb-like length (mean ~700 tokens),
    with the window as a tensor."""
    import numpy as np
    import torch

    from trainer.data import BOS

    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.integers(0, BOS, TOKENS)).cuda()
    starts = np.cumsum(rng.geometric(1 / 700, TOKENS // 100))
    tokens[torch.from_numpy(starts[starts < TOKENS])] = BOS
    tokens[0] = BOS
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 6, TOKENS, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    return tokens, torch.tensor(window, device="cuda"), (q, k, v), torch.randn_like(q)


def _flex_case(options: dict):
    def build():
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        from trainer.attention import document_ids, flex_block_mask

        tokens, window, (q, k, v), dy = _attention_inputs(14)
        mask = flex_block_mask(document_ids(tokens), window, 128)
        base = torch.compile(flex_attention, dynamic=False)
        tuned = torch.compile(flex_attention, dynamic=False)

        def step(fn, **kw):
            return lambda: torch.autograd.grad(fn(q, k, v, block_mask=mask, scale=0.12, **kw), (q, k, v), dy)

        return step(base), step(tuned, kernel_options=options)
    return build


# trainer/kernels/doc_attention.py's tiles to sweep: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel,
# on top of its GPU_CONFIGS
DOC_ATTENTION_TILES = {   # each compiles without spills for sm_90 (bench/kernel_resources.py)
    "fwd 128x128": {"fwd": (128, 128, 8, 3)},
    "fwd 64x64": {"fwd": (64, 64, 4, 3)},
    "dq 64x64 4 warps": {"dq": (64, 64, 4, 3)},
    "dq 64x32 4 warps": {"dq": (64, 32, 4, 3)},
    "dkdv 32x64 4 warps": {"dkdv": (32, 64, 4, 3)},
}


def _doc_attention_case(window: int, tiles: dict, backward: bool = True):
    """FlexAttention (compiled, with the trainer's block mask) against the Triton document attention, both
    with everything each needs per call (the block mask, the document bounds) built outside the timing."""
    def build():
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        import trainer.kernels.doc_attention as kernel
        from trainer.attention import document_bounds, document_ids, flex_block_mask

        tokens, w, (q, k, v), dy = _attention_inputs(window)
        mask = flex_block_mask(document_ids(tokens), w, 128)
        start, end = document_bounds(tokens)
        flex = torch.compile(flex_attention, dynamic=False)

        def step(fn):
            if not backward:
                return fn
            return lambda: torch.autograd.grad(fn(), (q, k, v), dy)

        ours = step(lambda: kernel.doc_attention(q, k, v, start, end, w, 128, 0.12))

        def ours_with_tiles():
            # the tiles hold for the whole call: the backward's kernels launch inside autograd.grad
            saved = dict(kernel.GPU_CONFIGS)
            kernel.GPU_CONFIGS.update(tiles)
            try:
                return ours()
            finally:
                kernel.GPU_CONFIGS.update(saved)

        return step(lambda: flex(q, k, v, block_mask=mask, scale=0.12)), ours_with_tiles
    return build


for _window in (1, 7, 14):
    case(f"attention fwd+bwd, window {_window}: flex vs triton doc attention", f"{TOKENS} tokens, 6x128 heads",
         calls_per_step=LAYERS * ACCUM)(_doc_attention_case(_window, {}))
case("attention fwd, window 14: flex vs triton doc attention", f"{TOKENS} tokens, 6x128 heads",
     calls_per_step=LAYERS * ACCUM)(_doc_attention_case(14, {}, backward=False))
for _label, _tiles in DOC_ATTENTION_TILES.items():
    case(f"attention fwd+bwd, window 14: flex vs triton doc attention, {_label}", f"{TOKENS} tokens, 6x128 heads")(
        _doc_attention_case(14, _tiles))


for _name, _opts in FLEX_OPTIONS.items():
    case(f"flex attention fwd+bwd, window 14: default vs {_name}", f"{TOKENS} tokens, 6x128 heads",
         calls_per_step=LAYERS * ACCUM)(_flex_case(_opts))
