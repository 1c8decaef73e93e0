"""The GPT's forward pass: start point, causality, document isolation; the schedules; the CLI's config."""
import json
import math

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
