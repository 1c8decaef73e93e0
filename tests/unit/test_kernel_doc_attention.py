"""The Triton document attention (forward, dq, dk/dv) against the dense float64 attention of trainer/attention.py.

Without a GPU the kernels run under Triton's interpreter with 16-32 token tiles, on sequences whose
documents and windows put run ends inside tiles, on tile edges and past the window; the GPU tests run
them compiled at the record's head shape and in the compiled model.
"""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from trainer.attention import attend, dense_attention, document_bounds, document_ids  # noqa: E402
from trainer.data import BOS  # noqa: E402
from trainer.kernels.doc_attention import doc_attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def packed(T, starts, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, BOS, (T,), generator=g)
    t[list(starts)] = BOS
    return t.to(DEV)


def qkv(B, H, T, D, dtype, seed=0, layout="bthd"):
    """q, k, v as the model hands them over: (B, H, T, D) views of (B, T, H, D) tensors, or contiguous."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        if layout == "bthd":
            t = torch.randn(B, T, H, D, generator=g).to(DEV, dtype).transpose(1, 2)
        elif layout == "strided_head_dim":   # copied to a unit head_dim stride inside the op
            t = torch.randn(B, H, D, T, generator=g).to(DEV, dtype).transpose(2, 3)
        else:
            t = torch.randn(B, H, T, D, generator=g).to(DEV, dtype)
        out.append(t.requires_grad_())
    return out


def check(tokens, window, block_size, dtype, tol, H=2, D=16, layout="bthd", seed=0):
    T = tokens.numel()
    q, k, v = qkv(1, H, T, D, dtype, seed, layout)
    start, end = document_bounds(tokens)
    w = torch.tensor(window, device=DEV)
    out = doc_attention(q, k, v, start, end, w, block_size, 0.3)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dense_attention(*ref_in, document_ids(tokens), window, block_size, 0.3)
    assert out.shape == ref.shape and not out.isnan().any()
    assert rel_err(out, ref) < tol
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(DEV)
    grads = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_in, g)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert a.shape == b.shape and not a.isnan().any(), name
        assert rel_err(a, b) < tol, f"d{name}: {rel_err(a, b):.2e}"


# documents: one long one; many, with starts inside tiles, on tile edges (32, 64) and at the last position;
# a sequence that does not start with BOS; T not a multiple of any tile
SEQUENCES = [(150, (0,)), (150, (0, 5, 32, 33, 64, 90, 149)), (97, (17, 50)), (160, (0, 1, 2, 3, 80))]


@pytest.mark.parametrize("T,starts", SEQUENCES)
@pytest.mark.parametrize("window", [1, 2, 3, 100])
def test_float32_matches_dense_float64(T, starts, window):
    check(packed(T, starts), window, 16, torch.float32, 1e-5)


@pytest.mark.parametrize("layout", ["bthd", "contiguous", "strided_head_dim"])
def test_bf16_inputs_within_bf16_rounding(layout):
    check(packed(150, (0, 5, 32, 90)), 3, 16, torch.bfloat16, 1.5e-2, layout=layout)


def test_two_sequences_with_their_own_documents():
    # one launch per sequence: a tile running past T must neither read nor write the next sequence's rows
    T, H, D = 70, 2, 16
    tokens = [packed(T, (0, 9, 40)), packed(T, (0, 33), seed=1)]
    bounds = [document_bounds(t) for t in tokens]
    start, end = (torch.cat([b[i] for b in bounds]) for i in (0, 1))
    q, k, v = qkv(2, H, T, D, torch.float32, seed=5)
    out = doc_attention(q, k, v, start, end, torch.tensor(2, device=DEV), 16, 0.3)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(DEV)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for i in range(2):
        ref_in = [t[i:i + 1].detach().double().requires_grad_() for t in (q, k, v)]
        ref = dense_attention(*ref_in, document_ids(tokens[i]), 2, 16, 0.3)
        assert rel_err(out[i:i + 1], ref) < 1e-5
        for a, r in zip(grads, torch.autograd.grad(ref, ref_in, g[i:i + 1].double())):
            assert rel_err(a[i:i + 1], r) < 1e-5


def test_window_longer_than_a_tile_and_block_not_a_tile_multiple():
    # block_size 24: window edges fall inside tiles of 16 and 32
    check(packed(200, (0, 130)), 2, 24, torch.float32, 1e-5, seed=3)


def test_attend_dispatches_on_the_mask_kind():
    from trainer.attention import DocBounds

    tokens = packed(64, (0, 20))
    q, k, v = (t.detach() for t in qkv(1, 2, 64, 16, torch.float32))
    docs = document_ids(tokens)
    start, end = document_bounds(tokens)
    dense = attend(q, k, v, None, docs, 2, 16, 0.3)
    kernel = attend(q, k, v, DocBounds(start, end, torch.tensor(2, device=DEV)), docs, 2, 16, 0.3)
    assert rel_err(kernel, dense) < 1e-5


def test_custom_op_registration():
    # schema, autograd registration, fake tensors (shapes and strides of the outputs) and AOT dispatch with
    # the backward, as torch.compile will use them
    tokens = packed(64, (0, 20))
    q, k, v = qkv(1, 2, 64, 16, torch.float32)
    start, end = document_bounds(tokens)
    args = (q, k, v, start, end, torch.tensor(2, device=DEV), 16, 0.3)
    torch.library.opcheck(torch.ops.speedrun.doc_attention_fwd.default, args)


def test_document_bounds():
    start, end = document_bounds(packed(10, (3, 4, 8)).cpu())
    assert start.tolist() == [[0, 0, 0, 3, 4, 4, 4, 4, 8, 8]]
    assert end.tolist() == [[3, 3, 3, 4, 8, 8, 8, 8, 10, 10]]
    assert start.dtype == end.dtype == torch.int32


def test_refuses_bad_inputs_with_one_sentence():
    tokens = packed(64, (0,))
    q, k, v = (t.detach() for t in qkv(1, 2, 64, 16, torch.float32))
    start, end = document_bounds(tokens)
    w = torch.tensor(2, device=DEV)
    with pytest.raises(ValueError, match="share one"):
        doc_attention(q, k[:, :, :32], v, start, end, w, 16, 0.3)
    with pytest.raises(ValueError, match="head_dim"):
        doc_attention(q[..., :12], k[..., :12], v[..., :12], start, end, w, 16, 0.3)
    with pytest.raises(ValueError, match="doc_start"):
        doc_attention(q, k, v, start.long(), end, w, 16, 0.3)
    with pytest.raises(ValueError, match="window"):
        doc_attention(q, k, v, start, end, torch.tensor(2.0, device=DEV), 16, 0.3)


def test_trainer_config_takes_triton_attention_and_cpu_runs_dense():
    from trainer.attention import implementation
    from trainer.config import TrainConfig

    assert TrainConfig(attention="triton").validate().attention == "triton"
    with pytest.raises(ValueError, match="attention"):
        TrainConfig(attention="flash").validate()
    assert implementation("triton", cuda=True) == "triton" and implementation("triton", cuda=False) == "dense"
    assert implementation("auto", cuda=True) == "flex" and implementation("auto", cuda=False) == "dense"
    assert implementation("flex", cuda=False) == "flex"


@gpu
@pytest.mark.parametrize("window", [1, 14])
def test_record_head_shape_on_gpu(window):
    import numpy as np

    rng = np.random.default_rng(0)   # FineWeb-like document lengths (mean ~700 tokens)
    T = 8192
    starts = np.cumsum(rng.geometric(1 / 700, 40))
    check(packed(T, [0, *starts[starts < T].tolist()]), window, 128, torch.bfloat16, 2e-2, H=6, D=128)


@gpu
def test_compiled_model_with_triton_attention_matches_flex():
    from trainer.fixtures import randomised_model, tiny_config

    cfg = tiny_config(model_dim=256, num_heads=2, head_dim=128, seq_len=2048, num_layers=4, num_value_embeds=2)
    model = randomised_model(cfg, std=0.02, device="cuda")
    model.act_dtype = torch.bfloat16
    t = packed(cfg.seq_len + 1, (0, 300, 301, 1000, 1500))
    w = torch.tensor(4, device="cuda")
    losses, grads = {}, {}
    for mode in ("flex", "triton"):
        model.attention = mode
        model.zero_grad(set_to_none=True)
        loss = torch.compile(model, dynamic=False)(t[:-1], t[1:], w)
        loss.backward()
        losses[mode] = loss.item()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert abs(losses["triton"] - losses["flex"]) < 1e-2 * losses["flex"]
    assert rel_err(grads["triton"], grads["flex"]) < 5e-2
