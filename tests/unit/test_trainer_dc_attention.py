"""Record-85's dynamically composable attention (dc_layer, trainer/dc_attention.py): the correction against a loop
written from its definition, the band's BlockMask against the dense band, the model at the gate's init, the
optimizer's group and the config's sentences; on the GPU, FlexAttention's correction and its gradients against
the dense one."""
import math

import pytest

torch = pytest.importorskip("torch")

from trainer import dc_attention as dc  # noqa: E402
from trainer.fixtures import packed_tokens, randomised_model, tiny_config  # noqa: E402
from trainer.optim import build_optimizers  # noqa: E402


def inputs(T=300, H=3, D=8, boundaries=(0, 130), seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, T, D, generator=g).to(device) for _ in range(3))
    w1, w2 = (torch.randn(1, T, H, generator=g).to(device) for _ in range(2))
    docs = torch.zeros(T, dtype=torch.long)
    for b in boundaries[1:]:
        docs[b:] += 1
    return q, k, v, w1, w2, docs.to(device)


def looped(q, k, v, w1, w2, docs, window, scale):
    """The definition, one token at a time: A = sum_g w1[g] softmax_g over the token's band, y_h += w2[h] A @ V_h."""
    _, H, T, _ = q.shape
    out = torch.zeros_like(q, dtype=torch.float64)
    for t in range(T):
        keys = [j for j in range(max(0, t - window + 1), t + 1) if docs[j] == docs[t]]
        A = torch.zeros(len(keys), dtype=torch.float64)
        for g in range(H):
            scores = torch.tensor([float(q[0, g, t] @ k[0, g, j]) * scale for j in keys], dtype=torch.float64)
            A += float(w1[0, t, g]) * torch.softmax(scores, 0)
        for h in range(H):
            out[0, h, t] = float(w2[0, t, h]) * (A[:, None] * v[0, h, keys].double()).sum(0)
    return out


def test_the_dense_correction_is_the_definition():
    q, k, v, w1, w2, docs = inputs()
    got = dc.dense_correction(q, k, v, w1, w2, docs, window=7, scale=0.3)
    assert torch.allclose(got.double(), looped(q, k, v, w1, w2, docs, 7, 0.3), atol=1e-5)
    # the band stops at a document's start: the first token of document 1 sees only itself
    t = 130
    expected = w2[0, t, :, None] * w1[0, t].sum() * v[0, :, t]
    assert torch.allclose(got[0, :, t], expected, atol=1e-5)


def test_the_band_mask_lists_the_blocks_the_band_reaches_and_flex_computes_the_same_correction():
    q, k, v, w1, w2, docs = inputs(T=512, H=2, D=16, boundaries=(0, 200, 201))
    for window in (1, 100, 128):
        bm = dc.flex_band_mask(docs, window, 128)
        band = dc.band_mask(docs, window)
        blocks = band.view(4, 128, 4, 128).any(-1).any(1)   # (query block, key block) the band touches
        listed = torch.zeros(4, 4, dtype=torch.bool)
        for qb in range(4):
            listed[qb, bm.kv_indices[0, 0, qb, :bm.kv_num_blocks[0, 0, qb]].long()] = True
        assert torch.equal(listed | blocks, listed)   # every block the band touches is listed
        transposed = torch.zeros(4, 4, dtype=torch.bool)
        for kb in range(4):
            transposed[bm.q_indices[0, 0, kb, :bm.q_num_blocks[0, 0, kb]].long(), kb] = True
        assert torch.equal(transposed, listed)   # the backward's lists are the same blocks
        with torch.no_grad():   # FlexAttention's eager forward runs on the CPU too
            flex = dc.flex_correction(q, k, v, w1, w2, bm, 0.1)
        assert torch.allclose(flex, dc.dense_correction(q, k, v, w1, w2, docs, window, 0.1), atol=1e-5)
    with pytest.raises(ValueError, match="dc_window: must be <= block_size=128"):
        dc.flex_band_mask(docs, 129, 128)


def test_the_gate_starts_at_one_for_every_head_and_no_correction():
    gate = dc.DCGate(32, 3)
    w1, w2 = gate(torch.randn(1, 10, 32))
    assert torch.allclose(w1, torch.ones_like(w1)) and torch.equal(w2, torch.zeros_like(w2))


def dc_config(**overrides):
    return tiny_config(num_layers=4, dc_layer=3, dc_gate_layer=1, dc_window=100, **overrides)


def test_the_model_starts_as_without_it_then_the_correction_trains():
    from trainer.model import GPT

    plain = randomised_model(tiny_config(num_layers=4), std=0.2)
    model = GPT(dc_config())
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == {"dc_gate.w1", "dc_gate.w2", "dc_gate.b2", "dc_gate.scale"} and not unexpected
    t = packed_tokens(513, (0, 200), 3).long()
    window = torch.tensor(2)
    assert torch.equal(model(t[:-1], t[1:], window), plain(t[:-1], t[1:], window))   # w2 = 0: y + 0
    loss = model(t[:-1], t[1:], window)
    loss.backward()
    assert model.dc_gate.w2.grad.abs().sum() > 0   # w2 (zero) gets a gradient: the correction can start
    with torch.no_grad():
        model.dc_gate.b2[model.cfg.num_heads:] = 10.0   # w2 = 1 for every head
    assert abs(model(t[:-1], t[1:], window).item() - loss.item()) > 1e-3


def test_the_gate_net_trains_in_its_own_adam_group_at_the_records_settings():
    cfg = dc_config()
    model = randomised_model(cfg)
    adam, muon = build_optimizers(model, cfg)
    gate = {id(p) for p in model.dc_gate.parameters()}
    groups = [g for g in adam.param_groups if {id(p) for p in g["params"]} & gate]
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == gate
    assert groups[0]["lr"] == pytest.approx(0.0008) and groups[0]["betas"] == (0.9, 0.99)
    assert not gate & {id(p) for g in muon.param_groups for p in g["params"]}


@pytest.mark.parametrize("overrides, sentence", [
    (dict(dc_layer=1, paired_head_layers="1"), "dc_layer: must be -1 (off) or a layer with attention that is not "
                                               "paired (got 1; layers 0, 2, 3 qualify)"),
    (dict(dc_layer=2, attn_skip_layers="2"), "dc_layer: must be -1 (off) or a layer with attention"),
    (dict(dc_layer=4), "dc_layer: must be -1 (off)"),
    (dict(dc_layer=-2), "dc_layer: must be -1 (off)"),
    (dict(dc_layer=1, dc_gate_layer=2), "dc_gate_layer: must be within 0..dc_layer=1 (got 2)"),
    (dict(dc_layer=3, dc_gate_layer=1, dc_window=129), "dc_window: must be within 1..block_size=128 (got 129)"),
])
def test_the_config_says_what_is_wrong(overrides, sentence):
    with pytest.raises(ValueError, match="^" + sentence.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(num_layers=4, **overrides)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flex_correction_and_its_gradients_match_the_dense_one_on_the_gpu():
    """Compiled FlexAttention (H attentions of H heads over the band) against the dense correction: the output and
    the gradients of q, k, v, w1 and w2, in float32 at a length of several blocks with a document boundary."""
    q, k, v, w1, w2, docs = inputs(T=1024, H=6, D=128, boundaries=(0, 300, 301, 700), device="cuda")
    leaves = [x.requires_grad_() for x in (q, k, v, w1, w2)]
    scale = 1 / math.sqrt(128)
    ref = dc.dense_correction(*leaves, docs, 112, scale)
    grads_ref = torch.autograd.grad(ref.square().sum(), leaves)
    flex_fn = torch.compile(dc.flex_correction)
    out = flex_fn(*leaves, dc.flex_band_mask(docs, 112, 128), scale)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    assert (out - ref).norm() / ref.norm() < 1e-3
    for got, want in zip(grads, grads_ref):
        assert (got - want).norm() / want.norm() < 1e-2
