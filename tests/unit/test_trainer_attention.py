"""The CPU attention against a per-query loop reference, under document and sliding-window masks."""
import pytest

torch = pytest.importorskip("torch")

from trainer.attention import dense_attention, dense_mask, document_ids, flex_block_mask  # noqa: E402
from trainer.data import BOS  # noqa: E402
from trainer.fixtures import packed_tokens  # noqa: E402


def loop_reference(q, k, v, tokens, window_blocks, block_size, scale, exact=False):
    """Spell the rule out: key j is visible to query i iff j <= i, no BOS in (j, i], and same-or-near block (or,
    exact, at most window_blocks * block_size positions back)."""
    T = tokens.numel()
    out = torch.zeros_like(q)
    doc_start = 0
    for i in range(T):
        if tokens[i] == BOS:
            doc_start = i
        reach = (lambda j: i - j <= window_blocks * block_size) if exact else \
            (lambda j: i // block_size - j // block_size < window_blocks)
        keys = [j for j in range(doc_start, i + 1) if reach(j)]
        s = (q[..., i, None, :] * k[..., keys, :]).sum(-1) * scale
        out[..., i, :] = (s.softmax(-1)[..., None] * v[..., keys, :]).sum(-2)
    return out


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("window_blocks", [1, 2, 3, 100])
@pytest.mark.parametrize("starts", [(0,), (0, 5, 40, 41, 90), (17, 64, 100)])
def test_dense_attention_matches_loop_reference(window_blocks, starts, exact):
    T, bs = 128, 16
    tokens = packed_tokens(T, starts)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, 8, dtype=torch.float64) for _ in range(3))
    got = dense_attention(q, k, v, document_ids(tokens), window_blocks, bs, 0.3, exact)
    ref = loop_reference(q, k, v, tokens, window_blocks, bs, 0.3, exact)
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
    exact = dense_mask(document_ids(tokens), 2, 16, exact=True)
    assert exact[127, 95] and not exact[127, 94]   # 32 positions back, not 33
    assert exact[96, 64] and not mask[96, 64]      # a block's first query reaches two blocks back, not one


def block_level(block_mask, nb):
    """Dense (nb, nb) map of a BlockMask: 2 = full block, 1 = partial (mask_mod), 0 = skipped."""
    out = torch.zeros(nb, nb, dtype=torch.int64)
    for counts, idx, val in ((block_mask.kv_num_blocks, block_mask.kv_indices, 1),
                             (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, 2)):
        for qb in range(nb):
            for j in range(int(counts[0, 0, qb])):
                out[qb, int(idx[0, 0, qb, j])] = val
    return out


def block_truth(dense, nb, bs):
    """(nb, nb) from the per-token mask: 2 = every pair visible, 1 = some, 0 = none."""
    tiles = dense.view(nb, bs, nb, bs).permute(0, 2, 1, 3).flatten(2)
    return torch.where(tiles.all(-1), 2, torch.where(tiles.any(-1), 1, 0))


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("window_blocks", [1, 3, 8])
def test_flex_block_mask_covers_exactly_the_dense_mask(window_blocks, exact):
    """Every block holding a visible pair is listed; 'full' blocks are entirely visible; skipped ones empty."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    T, bs = 512, 128
    tokens = packed_tokens(T, (0, 100, 130, 300, 301, 450))
    docs = document_ids(tokens)
    dense = dense_mask(docs, window_blocks, bs, exact)
    nb = T // bs
    kinds = block_level(flex_block_mask(docs, torch.tensor(window_blocks), bs, exact), nb)
    assert torch.equal(kinds, block_truth(dense, nb, bs))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("window_blocks", [1, 3])
def test_flex_attention_with_our_block_mask_matches_dense(window_blocks, exact):
    """FlexAttention (eager on CPU; compiled on the GPU, see test_trainer_gpu.py) computes the dense answer."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from trainer.attention import flex_attention

    T, bs = 512, 128
    tokens = packed_tokens(T, (0, 100, 130, 300, 301, 450))
    docs = document_ids(tokens)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, 32) for _ in range(3))
    got = flex_attention(q, k, v, flex_block_mask(docs, torch.tensor(window_blocks), bs, exact), 0.3)
    ref = dense_attention(q, k, v, docs, window_blocks, bs, 0.3, exact)
    assert torch.allclose(got, ref, atol=1e-5)


def listed(counts, idx):
    return [[int(i) for i in idx[0, 0, r, :int(counts[0, 0, r])]] for r in range(idx.size(2))]


@pytest.mark.parametrize("seed", range(6))
def test_flex_block_mask_lists_every_block_both_ways_in_order(seed):
    """All four lists (the forward's key blocks per query block, the backward's query blocks per key block,
    partial and full) hold exactly the blocks the per-token mask says, ascending, with in-range padding:
    documents starting anywhere, on block starts, back to back, windows from 1 to past the sequence."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(seed)
    for _ in range(40):
        bs = [4, 8, 16][int(torch.randint(0, 3, (), generator=g))]
        nb = int(torch.randint(1, 20, (), generator=g))
        T = nb * bs
        starts = torch.randint(0, T, (int(torch.randint(0, 10, (), generator=g)),), generator=g).tolist()
        starts += (torch.randint(0, nb, (2,), generator=g) * bs).tolist()
        tokens = packed_tokens(T, starts, seed=seed)
        docs = document_ids(tokens)
        window = int(torch.randint(1, nb + 3, (), generator=g))
        exact = bool(torch.randint(0, 2, (), generator=g))
        truth = block_truth(dense_mask(docs, window, bs, exact), nb, bs)
        mask = flex_block_mask(docs, torch.tensor(window), bs, exact)
        for counts, idx, kind, by_key in ((mask.kv_num_blocks, mask.kv_indices, 1, False),
                                          (mask.full_kv_num_blocks, mask.full_kv_indices, 2, False),
                                          (mask.q_num_blocks, mask.q_indices, 1, True),
                                          (mask.full_q_num_blocks, mask.full_q_indices, 2, True)):
            want = (truth.T if by_key else truth) == kind
            assert listed(counts, idx) == [torch.nonzero(row).flatten().tolist() for row in want]
            assert idx.dtype == torch.int32 and 0 <= int(idx.min()) and int(idx.max()) < nb
