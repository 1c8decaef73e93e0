"""Layers without an MLP (mlp_skip_layers): records 30 and 35 dropped the first layer's MLP, then its attention, so
attn_skip_layers="0,7" with mlp_skip_layers="0" is their 11-layer model inside ours."""
import pytest

torch = pytest.importorskip("torch")

from trainer.config import TrainConfig  # noqa: E402
from trainer.data import BOS  # noqa: E402
from trainer.fixtures import randomised_model, tiny_config  # noqa: E402
from trainer.model import GPT  # noqa: E402
from trainer.optim import build_optimizers  # noqa: E402


def test_the_records_11_layers_keep_only_the_first_layers_mixing_weights():
    full = TrainConfig()
    cut = TrainConfig(attn_skip_layers="0,7", mlp_skip_layers="0")
    with torch.device("meta"):   # the full-size models, no memory
        a, b = GPT(full), GPT(cut)
    first = a.blocks[0]
    assert b.blocks[0].attn is None and b.blocks[0].mlp is None
    assert [name for name, _ in b.blocks[0].named_parameters()] == ["lambdas"]
    gone = sum(p.numel() for p in first.attn.parameters()) + sum(p.numel() for p in first.mlp.parameters())
    assert sum(p.numel() for p in a.parameters()) - sum(p.numel() for p in b.parameters()) == gone
    assert all(blk.mlp is not None for blk in b.blocks[1:])


def test_a_layer_without_attention_or_mlp_passes_its_mixed_input_on_and_the_model_trains():
    cfg = tiny_config(num_layers=4, attn_skip_layers="0", mlp_skip_layers="0")
    model = randomised_model(cfg)
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, BOS, (513,), generator=g)
    t[0] = BOS
    seen = []
    model.blocks[0].register_forward_hook(lambda mod, args, out: seen.append((args[0], args[1], out)))
    loss = model(t[:-1], t[1:], torch.tensor(2))
    x, x0, out = seen[0]
    lam = model.blocks[0].lambdas.detach()
    assert torch.allclose(out, lam[0] * x + lam[1] * x0)
    loss.backward()
    adam, muon = build_optimizers(model, cfg)
    ids = [id(p) for opt in (adam, muon) for grp in opt.param_groups for p in grp["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    adam.step()
    muon.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("value, words", [
    ("12", "mlp_skip_layers: layer 12 does not exist in a 12-layer model"),
    ("first", "mlp_skip_layers: must be comma-separated layer numbers"),
])
def test_mlp_skip_layers_are_validated_naming_the_key(value, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(mlp_skip_layers=value).validate()
    assert TrainConfig(mlp_skip_layers="0, 5").validate().skipped_mlp_layers() == {0, 5}
