"""Record-77's saved activation (attn_input_layer): the attention of every later layer reads that layer's output."""
import pytest

torch = pytest.importorskip("torch")

from trainer.config import TrainConfig  # noqa: E402
from trainer.fixtures import packed_tokens, randomised_model, tiny_config  # noqa: E402
from trainer.layers import norm  # noqa: E402
from trainer.optim import build_optimizers  # noqa: E402


def tokens():
    return packed_tokens(513, seed=3)


def test_later_layers_attend_over_the_saved_output_and_earlier_ones_over_their_own_input():
    model = randomised_model(tiny_config(num_layers=4, attn_input_layer=1))
    outs, attn_ins, block_ins = {}, {}, {}
    for i, b in enumerate(model.blocks):
        b.register_forward_hook(lambda mod, args, out, i=i: outs.__setitem__(i, out))
        b.register_forward_pre_hook(lambda mod, args, i=i: block_ins.__setitem__(i, args))
        b.attn.register_forward_pre_hook(lambda mod, args, i=i: attn_ins.__setitem__(i, args[0]))
    t = tokens()
    loss = model(t[:-1], t[1:], torch.tensor(2))
    for i in (2, 3):
        torch.testing.assert_close(attn_ins[i], norm(outs[1]))
    x, x0 = block_ins[1][0], block_ins[1][1]
    lam = model.blocks[1].lambdas.detach()
    torch.testing.assert_close(attn_ins[1], norm(lam[0] * x + lam[1] * x0))   # up to layer 1: as before
    loss.backward()
    adam, muon = build_optimizers(model, model.cfg)
    adam.step(), muon.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())


def test_off_is_the_same_model():
    t = tokens()
    a = randomised_model(tiny_config(num_layers=4))
    b = randomised_model(tiny_config(num_layers=4, attn_input_layer=3 - 1))
    assert not torch.equal(a(t[:-1], t[1:], torch.tensor(2)), b(t[:-1], t[1:], torch.tensor(2)))
    assert torch.equal(a(t[:-1], t[1:], torch.tensor(2)),
                       randomised_model(tiny_config(num_layers=4, attn_input_layer=-1))(t[:-1], t[1:],
                                                                                       torch.tensor(2)))


@pytest.mark.parametrize("value", [-2, 11, 12])
def test_attn_input_layer_is_validated_naming_the_key(value):
    with pytest.raises(ValueError, match="^attn_input_layer: must be -1 \\(off\\) or a layer before the last"):
        TrainConfig(attn_input_layer=value).validate()
    assert TrainConfig(attn_input_layer=8).validate().attn_input_layer == 8
