"""The GPT's forward pass: start point, causality, document isolation; the schedules; the CLI's config."""
import json
import math
import re

import pytest

torch = pytest.importorskip("torch")

from trainer.__main__ import main as trainer_main  # noqa: E402
from trainer.data import BOS  # noqa: E402
from trainer.fixtures import randomised_model, tiny_config  # noqa: E402
from trainer.model import GPT  # noqa: E402
from trainer.optim import split_parameters  # noqa: E402
from trainer.schedules import lr_scale, muon_momentum, window_blocks  # noqa: E402


def sequence(T=256, starts=(0, 100)):
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, BOS, (T + 1,), generator=g)
    t[list(starts)] = BOS
    return t


def test_initial_loss_is_uniform_over_the_vocabulary():
    cfg = tiny_config()
    t = sequence()
    loss = GPT(cfg)(t[:-1], t[1:], torch.tensor(2))
    assert loss.item() == pytest.approx(math.log(cfg.vocab_size), abs=1e-5)   # zero-initialised head


def per_token(model, t, window=4):
    return model(t[:-1], t[1:], torch.tensor(window), reduction="none").detach()


def test_future_tokens_do_not_change_earlier_predictions():
    model = randomised_model(tiny_config())
    t = sequence()
    changed = t.clone()
    changed[200:] = (changed[200:] + 7) % BOS
    a, b = per_token(model, t), per_token(model, changed)
    assert torch.allclose(a[:199], b[:199], atol=1e-5)
    assert not torch.allclose(a[199:], b[199:])


def test_a_document_does_not_see_the_previous_one():
    model = randomised_model(tiny_config())
    t = sequence(starts=(0, 100))
    changed = t.clone()
    changed[1:100] = (changed[1:100] + 11) % BOS
    a, b = per_token(model, t), per_token(model, changed)
    assert torch.allclose(a[100:], b[100:], atol=1e-5)


def test_every_parameter_has_exactly_one_optimizer():
    model = GPT(tiny_config(num_layers=4, num_value_embeds=2))
    parts = split_parameters(model)
    ids = [id(p) for group in parts.values() for p in group]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.ndim >= 2 for p in parts["hidden"]) and all(p.ndim < 2 for p in parts["scalars"])


def test_value_embeddings_feed_early_and_late_layers():
    model = GPT(tiny_config(num_layers=8, num_value_embeds=3))
    assert model.ve_of_layer == [0, 1, 2, None, None, 0, 1, 2]


def test_schedules():
    cfg = tiny_config(steps=100, cooldown_frac=0.5, window_min_blocks=1, window_max_blocks=9,
                      muon_momentum_warmup_steps=10)
    assert lr_scale(cfg, 0) == lr_scale(cfg, 50) == 1.0
    assert lr_scale(cfg, 75) == pytest.approx(0.55) and lr_scale(cfg, 100) == pytest.approx(0.1)
    assert [window_blocks(cfg, s) for s in (0, 50, 100)] == [1, 5, 9]
    assert muon_momentum(cfg, 0) == pytest.approx(cfg.muon_momentum_warmup_start)
    assert muon_momentum(cfg, 10) == muon_momentum(cfg, 99) == pytest.approx(cfg.muon_momentum)


@pytest.mark.parametrize("args, words", [
    (["--set", "steps=0"], "steps: must be > 0"),
    (["--set", "stepz=3"], "unknown TrainConfig key"),
    (["--set", "compile=maybe"], "must be true or false"),
])
def test_bad_settings_exit_2_with_one_sentence(tmp_path, caplog, args, words):
    code = trainer_main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out"), *args])
    assert code == 2 and words in caplog.text
    assert not (tmp_path / "out").exists()


def test_bad_config_file_exits_2(tmp_path, caplog):
    (tmp_path / "cfg.json").write_text(json.dumps({"num_layers": "twelve"}))
    code = trainer_main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o"), "--config", str(tmp_path / "cfg.json")])
    assert code == 2 and "cfg.json" in caplog.text


def test_missing_shards_exit_1_naming_the_directory(tmp_path, caplog):
    code = trainer_main(["--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "o"),
                         "--set", "device=cpu", "--set", "compile=false"])
    assert code == 1 and "nowhere" in caplog.text and "no file matches" in caplog.text


@pytest.mark.parametrize("prep, tables", [("triton", 1), ("torch", 4)])
def test_the_compiled_forward_computes_the_rotary_tables_once_for_the_kernel(prep, tables):
    """With attn_prep=triton all layers share one Rotary, so AOT autograd's CSE leaves one cos per forward; the
    torch path keeps one per layer (shared, it slows inductor's own norm + rotary kernels)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep,   # inductor's partitioner
                                     partition_fn=min_cut_rematerialization_partition)

    torch.manual_seed(0)
    model = GPT(tiny_config(num_layers=4, attn_prep=prep))
    tokens = torch.randint(1, 256, (256,))
    torch.compile(model, backend=backend, fullgraph=True)(tokens, tokens, torch.tensor(2)).backward()
    forward = graphs[0].graph
    assert sum(n.target is torch.ops.aten.cos.default for n in forward.nodes) == tables


def test_every_attention_layer_scales_its_softmax_by_attn_scale(monkeypatch):
    """record-28's 0.12 by default; record-31 runs YaRN from 0.1 (attn_scale), the composition correction too."""
    from trainer import attention as attn_impl

    seen = []
    real = attn_impl.attend
    # attend(q, k, v, mask, docs, window_blocks, block_size, scale, exact): the scale is the 8th
    monkeypatch.setattr(attn_impl, "attend", lambda *a: seen.append(a[7]) or real(*a))
    t = torch.randint(0, BOS, (257,), generator=torch.Generator().manual_seed(0))
    t[0] = BOS
    losses = []
    for cfg in (tiny_config(), tiny_config(attn_scale=0.1)):
        seen.clear()
        model = randomised_model(cfg)
        losses.append(model(t[:-1], t[1:], torch.tensor(2)))
        layers = sum(b.attn is not None for b in model.blocks)
        assert seen == [cfg.attn_scale] * layers
    assert not torch.equal(*losses)
    with pytest.raises(ValueError, match="^attn_scale: must be > 0"):
        tiny_config(attn_scale=0.0)


def test_value_embed_layers_give_each_listed_layer_a_table_of_its_own_at_its_init_std():
    """records 63 and 70: one table per layer, at the layers listed, drawn N(0, value_embed_init_std)."""
    model = GPT(tiny_config(num_layers=6, value_embed_layers="1,2,5", value_embed_init_std=0.01))
    assert model.ve_of_layer == [None, 0, 1, None, None, 2] and len(model.value_embeds) == 3
    for ve in model.value_embeds:
        assert 0.008 < ve.weight.std().item() < 0.012
    default = GPT(tiny_config(num_layers=6, num_value_embeds=2))
    assert default.ve_of_layer == [0, 1, None, None, 0, 1] and default.value_embeds[0].weight.std().item() > 0.9
    t = torch.randint(0, BOS, (257,), generator=torch.Generator().manual_seed(0))
    t[0] = BOS
    model = randomised_model(tiny_config(num_layers=6, value_embed_layers="1,2,5", value_embed_init_std=0.01))
    model(t[:-1], t[1:], torch.tensor(2)).backward()
    assert all(ve.weight.grad.abs().sum() > 0 for ve in model.value_embeds)
    assert {id(ve.weight) for ve in model.value_embeds} <= {id(p) for p in split_parameters(model)["embed"]}


@pytest.mark.parametrize("layers, words", [("1,9", "layer 9 does not exist in a 6-layer model"),
                                           ("1,3", "layer 3 has no attention (attn_skip_layers)")])
def test_value_embed_layers_outside_the_model_or_without_attention_are_refused(layers, words):
    with pytest.raises(ValueError, match=rf"^value_embed_layers: {re.escape(words)}"):
        tiny_config(num_layers=6, attn_skip_layers="3", value_embed_layers=layers)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_window_exact_reaches_both_attention_paths():
    """record-29's token-counted window: the dense (CPU) path and FlexAttention's block mask agree, and differ from
    record-28's block-counted one where a window ends inside a block."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    t = torch.randint(0, BOS, (513,), generator=torch.Generator().manual_seed(1))
    t[0] = BOS
    losses = {}
    for exact in (False, True):
        model = randomised_model(tiny_config(window_exact=exact, num_layers=3))
        for attention in ("dense", "flex"):
            model.attention = attention
            with torch.no_grad():
                losses[exact, attention] = model(t[:-1], t[1:], torch.tensor(1))
    torch.testing.assert_close(losses[True, "dense"], losses[True, "flex"])
    torch.testing.assert_close(losses[False, "dense"], losses[False, "flex"])
    assert losses[True, "dense"] != losses[False, "dense"]
