"""Record-64's mimetic V-O init (attn_vo_init): each attention layer starts as -beta times its attended values."""
import pytest

torch = pytest.importorskip("torch")

from trainer.config import TrainConfig  # noqa: E402
from trainer.data import BOS  # noqa: E402
from trainer.fixtures import tiny_config  # noqa: E402
from trainer.model import GPT  # noqa: E402
from trainer.optim import build_optimizers  # noqa: E402


def test_value_then_output_projection_start_near_minus_beta_identity():
    beta = 0.05
    torch.manual_seed(0)
    model = GPT(tiny_config(num_layers=4, attn_vo_init=beta))
    for block in model.blocks:
        v, o = block.attn.qkv_w[2].detach(), block.attn.c_proj.weight.detach()
        product = o @ v                                   # what a token's value becomes in the residual
        eye = torch.eye(product.size(0))
        assert abs(product.diagonal().mean().item() + beta) < 0.002
        assert (product + beta * eye).abs().max() < 0.02  # the noise only: ~sqrt(beta) x 0.01 per entry
        assert (v - beta ** 0.5 * eye).std() == pytest.approx(0.01, rel=0.1)   # noise breaks the symmetry
    q, k = model.blocks[0].attn.qkv_w[0], model.blocks[0].attn.qkv_w[1]
    assert q.abs().max() <= 3 ** 0.5 * 64 ** -0.5 and k.abs().max() <= 3 ** 0.5 * 64 ** -0.5   # as before


def test_off_keeps_record28s_init():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    assert all((b.attn.c_proj.weight == 0).all() for b in model.blocks)
    bound = 3 ** 0.5 * 64 ** -0.5
    assert all(b.attn.qkv_w[2].abs().max() <= bound for b in model.blocks)


def test_attention_adds_to_the_residual_from_the_first_step_and_the_model_trains():
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, BOS, (513,), generator=g)
    t[0] = BOS
    losses = {}
    for beta in (0.0, 0.05):
        cfg = tiny_config(attn_vo_init=beta)
        torch.manual_seed(0)
        model = GPT(cfg)
        seen = []
        model.blocks[0].attn.register_forward_hook(lambda mod, args, out: seen.append(out))
        adam, muon = build_optimizers(model, cfg)
        curve = []
        for _ in range(5):
            loss = model(t[:-1], t[1:], torch.tensor(2))
            loss.backward()
            adam.step(), muon.step(), model.zero_grad(set_to_none=True)
            curve.append(loss.item())
        assert (seen[0].abs().max() > 0) == (beta > 0)   # record-28's zero output projection adds nothing at first
        losses[beta] = curve
    assert losses[0.05][-1] < losses[0.05][0] and all(map(lambda x: x == x, losses[0.05]))


@pytest.mark.parametrize("kw", [dict(attn_vo_init=-0.1), dict(attn_vo_init=0.05, num_heads=4, head_dim=128)])
def test_attn_vo_init_is_validated_naming_the_key(kw):
    with pytest.raises(ValueError, match="^attn_vo_init: must be >= 0, and > 0 only with num_heads x head_dim"):
        TrainConfig(**kw).validate()
