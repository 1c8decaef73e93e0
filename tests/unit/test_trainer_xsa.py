"""Record-82's learnable XSA (xsa): each head's output loses tanh(alpha) of its component along the token's value."""
import pytest

torch = pytest.importorskip("torch")

from trainer.data import BOS  # noqa: E402
from trainer.fixtures import randomised_model, tiny_config  # noqa: E402
from trainer.layers import exclude_own_value  # noqa: E402
from trainer.optim import build_optimizers, split_parameters  # noqa: E402


def test_full_strength_leaves_each_head_orthogonal_to_its_own_value_and_zero_changes_nothing():
    g = torch.Generator().manual_seed(0)
    y, v = torch.randn(2, 5, 3, 16, generator=g, dtype=torch.float64), torch.randn(2, 5, 3, 16, generator=g,
                                                                                   dtype=torch.float64)
    full = exclude_own_value(y, v, torch.full((3,), 20.0, dtype=torch.float64))   # tanh(20) = 1 in float64
    assert (full * v).sum(-1).abs().max() < 1e-12
    assert torch.equal(exclude_own_value(y, v, torch.zeros(3, dtype=torch.float64)), y)
    half = exclude_own_value(y, v, torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64))
    along = (y * v).sum(-1, keepdim=True) / v.square().sum(-1, keepdim=True) * v
    torch.testing.assert_close(half[:, :, 1], (y - torch.tanh(torch.tensor(0.5)).item() * along)[:, :, 1])
    assert torch.equal(half[:, :, 0], y[:, :, 0]) and torch.equal(half[:, :, 2], y[:, :, 2])


def test_every_layer_but_the_paired_ones_gets_a_per_head_strength_trained_by_adam_at_the_records_lr():
    cfg = tiny_config(num_layers=4, paired_head_layers="1", xsa=True)
    model = randomised_model(cfg)
    has = [b.attn.xsa_alpha is not None for b in model.blocks]
    assert has == [True, False, True, True]
    alphas = [b.attn.xsa_alpha for b in model.blocks if b.attn.xsa_alpha is not None]
    parts = split_parameters(model)
    assert [id(p) for p in parts["xsa"]] == [id(p) for p in alphas]
    assert not {id(p) for p in parts["scalars"]} & {id(p) for p in alphas}
    adam, _ = build_optimizers(model, cfg)
    group = next(g for g in adam.param_groups if any(p is alphas[0] for p in g["params"]))
    assert group["lr"] == cfg.adam_xsa_lr == 0.008 and group["betas"] == (0.9, 0.95) and len(group["params"]) == 3
    assert all(b.attn.xsa_alpha.shape == (cfg.num_heads,) for b in model.blocks if b.attn.xsa_alpha is not None)


def test_at_its_zero_init_the_model_is_the_one_without_it_and_the_strength_learns():
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, BOS, (513,), generator=g)
    t[0] = BOS
    w = torch.tensor(2)
    off = randomised_model(tiny_config())
    on = randomised_model(tiny_config(xsa=True))
    on.load_state_dict(off.state_dict(), strict=False)   # the same weights; on has its zero strengths besides
    assert torch.equal(on(t[:-1], t[1:], w), off(t[:-1], t[1:], w))
    adam, muon = build_optimizers(on, on.cfg)
    on(t[:-1], t[1:], w).backward()
    alphas = [b.attn.xsa_alpha for b in on.blocks]
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in alphas)
    adam.step(), muon.step()
    assert all(a.detach().abs().sum() > 0 for a in alphas)
