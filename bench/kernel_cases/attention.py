"""Attention: FlexAttention's kernel options against its defaults (trainer/attention.py).

A Triton document attention of our own (FlashAttention-2 style: forward, dq, dk/dv over each query's
contiguous run of visible keys) ran 0.52-0.83x FlexAttention's speed on an H200 (2026-11-29, windows 1-14,
fwd+bwd, at its best tiles) and was deleted; it is in the history at commit dac6700."""
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


for _name, _opts in FLEX_OPTIONS.items():
    case(f"flex attention fwd+bwd, window 14: default vs {_name}", f"{TOKENS} tokens, 6x128 heads",
         calls_per_step=LAYERS * ACCUM)(_flex_case(_opts))
