"""The CPU attention against a per-query loop reference, under document and sliding-window masks."""
import math

import pytest

torch = pytest.importorskip("torch")

from trainer.attention import dense_attention, dense_mask, document_ids, flex_block_mask  # noqa: E402
from trainer.data import BOS  # noqa: E402


def loop_reference(q, k, v, tokens, window_blocks, block_size, scale):
    """Spell the rule out: key j is visible to query i iff j <= i, no BOS in (j, i], and same-or-near block."""
    T = tokens.numel()
    out = torch.zeros_like(q)
    doc_start = 0
    for i in range(T):
        if tokens[i] == BOS:
            doc_start = i
        keys = [j for j in range(doc_start, i + 1) if i // block_size - j // block_size < window_blocks]
        s = (q[..., i, None, :] * k[..., keys, :]).sum(-1) * scale
        out[..., i, :] = (s.softmax(-1)[..., None] * v[..., keys, :]).sum(-2)
    return out


def packed_tokens(T, starts, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, BOS, (T,), generator=g)
    t[list(starts)] = BOS
    return t


@pytest.mark.parametrize("window_blocks", [1, 2, 3, 100])
@pytest.mark.parametrize("starts", [(0,), (0, 5, 40, 41, 90), (17, 64, 100)])
def test_dense_attention_matches_loop_reference(window_blocks, starts):
    T, bs = 128, 16
    tokens = packed_tokens(T, starts)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, 8, dtype=torch.float64) for _ in range(3))
    got = dense_attention(q, k, v, document_ids(tokens), window_blocks, bs, 0.3)
    ref = loop_reference(q, k, v, tokens, window_blocks, bs, 0.3)
    assert torch.allclose(got, ref, atol=1e-10)


def test_no_attention_across_a_document_start():
    tokens = packed_tokens(64, (0, 30))
    mask = dense_mask(document_ids(tokens), 100, 16)
    assert not mask[30:, :30].any()          # the second document never sees the first
    assert mask[29, :30].all()               # the first document sees all of its own past
    assert not mask.triu(1).any()            # causal


def test_window_limits_how_far_back_a_query_sees():
    tokens = packed_tokens(128, (0,))
    mask = dense_mask(document_ids(tokens), 2, 16)
    assert mask[127, 96] and not mask[127, 95]   # blocks 7 and 6 visible, block 5 not


def block_level(block_mask, nb):
    """Dense (nb, nb) map of a BlockMask: 2 = full block, 1 = partial (mask_mod), 0 = skipped."""
    out = torch.zeros(nb, nb, dtype=torch.int64)
    for counts, idx, val in ((block_mask.kv_num_blocks, block_mask.kv_indices, 1),
                             (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, 2)):
        for qb in range(nb):
            for j in range(int(counts[0, 0, qb])):
                out[qb, int(idx[0, 0, qb, j])] = val
    return out


@pytest.mark.parametrize("window_blocks", [1, 3, 8])
def test_flex_block_mask_covers_exactly_the_dense_mask(window_blocks):
    """Every block holding a visible pair is listed; 'full' blocks are entirely visible; skipped ones empty."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    T, bs = 512, 128
    tokens = packed_tokens(T, (0, 100, 130, 300, 301, 450))
    docs = document_ids(tokens)
    dense = dense_mask(docs, window_blocks, bs)
    nb = T // bs
    kinds = block_level(flex_block_mask(docs, torch.tensor(window_blocks), bs), nb)
    for qb in range(nb):
        for kb in range(nb):
            tile = dense[qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs]
            if kinds[qb, kb] == 0:
                assert not tile.any()
            elif kinds[qb, kb] == 2:
                assert tile.all()
            else:
                assert tile.any() and not tile.all()
    assert math.isclose(float(kinds.count_nonzero()), float(sum(
        dense[a * bs:(a + 1) * bs, b * bs:(b + 1) * bs].any() for a in range(nb) for b in range(nb))))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("window_blocks", [1, 3])
def test_flex_attention_with_our_block_mask_matches_dense(window_blocks):
    """FlexAttention (eager on CPU; compiled on the GPU, see test_trainer_gpu.py) computes the dense answer."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from trainer.attention import flex_attention

    T, bs = 512, 128
    tokens = packed_tokens(T, (0, 100, 130, 300, 301, 450))
    docs = document_ids(tokens)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, 32) for _ in range(3))
    got = flex_attention(q, k, v, flex_block_mask(docs, torch.tensor(window_blocks), bs), 0.3)
    ref = dense_attention(q, k, v, docs, window_blocks, bs, 0.3)
    assert torch.allclose(got, ref, atol=1e-5)
