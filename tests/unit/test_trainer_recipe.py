"""The record-28 recipe elements of the trainer: the attention gate, the layer without attention, the window
layout and schedule, the optimizers' rates, the loader's alignment and bf16 validation."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from trainer.config import TrainConfig  # noqa: E402
from trainer.data import BOS, TrainBatches, write_shard  # noqa: E402
from orchestrator.data.synthetic import markov_shards  # noqa: E402
from trainer.fixtures import randomised_model, tiny_config  # noqa: E402
from trainer.layers import Attention  # noqa: E402
from trainer.model import GPT, attention_layout  # noqa: E402
from trainer.optim import build_optimizers, split_parameters  # noqa: E402
from trainer.schedules import window_blocks  # noqa: E402
from trainer.train import Trainer  # noqa: E402


def attention_inputs(T=256, dim=64):
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.rms_norm(torch.randn(1, T, dim, generator=g), (dim,))
    docs = torch.zeros(T, dtype=torch.long)
    return x, docs


def gated_attention(gate_dims=12, dim=64, heads=2, head_dim=32):
    torch.manual_seed(1)
    attn = Attention(dim, heads, head_dim, gate_dims=gate_dims)
    with torch.no_grad():
        attn.c_proj.weight.normal_(0, 0.1)   # zero at init: it would hide the heads' outputs
    return attn


def test_gate_with_zero_weights_scales_every_head_by_exactly_one_half():
    attn = gated_attention()
    x, docs = attention_inputs()
    gated = attn(x, None, docs, 2, 128, None)
    assert not attn.gate.weight.any()
    attn.gate = None
    plain = attn(x, None, docs, 2, 128, None)
    assert torch.equal(gated, 0.5 * plain)   # sigmoid(0) = 0.5, and halving is exact in floating point


def test_gate_scales_each_head_by_sigmoid_of_its_projection_of_the_first_dims():
    attn = gated_attention(gate_dims=12)
    x, docs = attention_inputs()
    with torch.no_grad():
        attn.gate.weight.normal_(0, 1.0)
    gated = attn(x, None, docs, 2, 128, None)
    w, proj = attn.gate.weight.detach().clone(), attn.c_proj.weight.detach().clone()
    attn.gate = None
    with torch.no_grad():   # each head alone through c_proj, then weighted by its own gate
        heads = []
        for h in range(2):
            attn.c_proj.weight.zero_()
            attn.c_proj.weight[:, h * 32:(h + 1) * 32] = proj[:, h * 32:(h + 1) * 32]
            heads.append(attn(x, None, docs, 2, 128, None))
    gates = torch.sigmoid(x[..., :12] @ w.t())   # (1, T, heads): only the first 12 dims of the input
    want = sum(gates[..., h:h + 1] * heads[h] for h in range(2))
    assert torch.allclose(gated, want, atol=1e-6)


def test_gate_is_trained_by_muon_and_gets_a_gradient():
    cfg = tiny_config()
    model = randomised_model(cfg)
    t = torch.randint(0, BOS, (257,))
    t[0] = BOS
    model(t[:-1], t[1:], torch.tensor(2)).backward()
    gate = model.blocks[0].attn.gate.weight
    assert gate.shape == (cfg.num_heads, cfg.attn_gate_dims)
    assert any(p is gate for p in split_parameters(model)["hidden"])
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert GPT(tiny_config(attn_gate=False)).blocks[0].attn.gate is None


def test_record_layout_layer_7_has_no_attention_and_long_windows_at_0_4_11():
    cfg = TrainConfig(paired_head_layers="")   # record-28's layout: no paired heads (record-58's, on by default)
    layout = attention_layout(cfg)
    assert layout == ["long", "short", "short", "short", "long", "short", "short", None, "short", "short",
                      "short", "long"]
    with torch.device("meta"):   # the full-size model, no memory
        model = GPT(cfg)
    assert [b.attn is None for b in model.blocks] == [i == 7 for i in range(12)]
    mlp_and_lambdas = sum(p.numel() for p in model.blocks[7].mlp.parameters()) + 2
    assert sum(p.numel() for p in model.blocks[7].parameters()) == mlp_and_lambdas
    # with no layer skipped, layer 7 is a long-window layer like record-28 lays it out
    assert attention_layout(TrainConfig(attn_skip_layers=""))[7] == "long"


@pytest.mark.parametrize("value, words", [
    ("12", "layer 12 does not exist in a 12-layer model"),
    ("seven", "comma-separated layer numbers"),
])
def test_skipped_layers_are_validated(value, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(attn_skip_layers=value).validate()
    assert TrainConfig(attn_skip_layers="5, 7").validate().skipped_attention_layers() == {5, 7}


def test_window_schedule_is_record_28s():
    """record-28: the window is 1728 * (step / steps) tokens rounded up to a multiple of 128, at least 128."""
    cfg = TrainConfig()
    for step in range(cfg.steps + 1):
        tokens = 1728 * (step / cfg.steps)
        want = max(128, next(m for m in range(128, 1920, 128) if m >= tokens)) // 128
        assert window_blocks(cfg, step) == want, step
    assert window_blocks(cfg, 0) == 1 and window_blocks(cfg, cfg.steps) == 14
    short = TrainConfig(steps=200)
    assert [window_blocks(short, s) for s in (1, 15, 100, 192, 193)] == [1, 2, 7, 13, 14]


def test_optimizer_rates_are_record_28s():
    """record-28: Adam lr 0.008 times 75 (embeddings), 1 (head), 5 (scalars); Muon 0.05 with Newton-Schulz."""
    cfg = tiny_config(adam_embed_lr=TrainConfig.adam_embed_lr, adam_head_lr=TrainConfig.adam_head_lr)
    adam, muon = build_optimizers(GPT(cfg), cfg)
    assert [g["lr"] for g in adam.param_groups] == pytest.approx([0.008 * 75, 0.008, 0.008 * 5])
    assert adam.defaults["betas"] == (0.8, 0.95)
    # its eps 1e-10 damps gradients of a loss summed over 49,152 tokens; ours are means, so eps shrinks with them
    assert adam.defaults["eps"] * 49152 == pytest.approx(1e-10)
    assert muon.param_groups[0]["lr"] == 0.05 and muon.coeffs[0] == (3.4445, -4.7750, 2.0315)
    assert muon.margin == 1.0


def test_next_micro_batch_starts_at_the_document_that_begins_where_this_one_ends(tmp_path):
    """record-28's loader: a BOS that is a sequence's last target starts the next sequence."""
    seq_len = 64
    tokens = np.arange(1000, 1400) % BOS
    tokens[[0, seq_len, 150, 300]] = BOS   # documents at 0, 64 (= 0 + seq_len), 150, 300
    write_shard(str(tmp_path / "fineweb_train_000001.bin"), tokens)
    batches = TrainBatches([str(tmp_path / "fineweb_train_000001.bin")], seq_len, 0, 1, 3)
    a, b, c = batches.next_step()
    assert a[-1] == BOS and b[0] == BOS and np.array_equal(b, tokens[64:129])
    assert np.array_equal(c, tokens[150:215])   # b ended at 128 inside a document: its tail is skipped


def test_validation_runs_in_eval_mode_and_training_resumes_after(tmp_path):
    """Eval mode is what switches every FP8 path off (the record's metric is bf16)."""
    markov_shards(tmp_path / "data")
    trainer = Trainer(tiny_config(steps=2, val_every=1), str(tmp_path / "data"), str(tmp_path / "out"))
    seen = []
    trainer.model.register_forward_hook(lambda module, args, out: seen.append(module.training))
    trainer.validate(0)
    assert seen and not any(seen) and trainer.model.training
    loss = trainer.train_step(trainer.batches.next_step(), 0)
    assert seen[-1] and math.isfinite(loss.item())
