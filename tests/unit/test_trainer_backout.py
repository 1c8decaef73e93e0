"""Record-40's backout (backout_layer): the head reads the final residual minus a learned share of one layer's output."""
import pytest

torch = pytest.importorskip("torch")

from trainer.config import TrainConfig  # noqa: E402
from trainer.fixtures import packed_tokens, randomised_model, tiny_config  # noqa: E402
from trainer.optim import build_optimizers, split_parameters  # noqa: E402


def tokens():
    return packed_tokens(513, seed=5)


def head_input(model, t):
    """The residual the head reads (model.logits' argument) and each block's output, from one forward."""
    seen, outs = {}, {}
    logits = model.logits
    model.logits = lambda x: (seen.__setitem__("x", x), logits(x))[1]
    hooks = [b.register_forward_hook(lambda mod, args, out, i=i: outs.__setitem__(i, out))
             for i, b in enumerate(model.blocks)]
    loss = model(t[:-1], t[1:], torch.tensor(2))
    del model.logits
    for h in hooks:
        h.remove()
    return loss, seen["x"], outs


def test_the_head_reads_the_last_output_minus_lambda_times_the_backout_layers_output():
    model = randomised_model(tiny_config(num_layers=4, backout_layer=1))
    assert model.backout_lambda.item() == 0.5   # the record's init
    t = tokens()
    with torch.no_grad():
        model.backout_lambda.fill_(0.7)
    _, x, outs = head_input(model, t)
    torch.testing.assert_close(x, (outs[3] - 0.7 * outs[1])[0])
    with torch.no_grad():
        model.backout_lambda.zero_()
    _, x, outs = head_input(model, t)
    torch.testing.assert_close(x, outs[3][0])   # lambda 0: the model without backout


def test_lambda_gets_a_gradient_and_trains_with_the_scalars_at_their_adam_rate():
    model = randomised_model(tiny_config(num_layers=4, backout_layer=2))
    assert any(p is model.backout_lambda for p in split_parameters(model)["scalars"])
    t = tokens()
    model(t[:-1], t[1:], torch.tensor(2)).backward()
    assert model.backout_lambda.grad is not None and model.backout_lambda.grad.abs().item() > 0
    adam, muon = build_optimizers(model, model.cfg)
    group = next(g for g in adam.param_groups if any(p is model.backout_lambda for p in g["params"]))
    assert group["lr"] == model.cfg.adam_scalar_lr
    before = model.backout_lambda.item()
    adam.step(), muon.step()
    assert model.backout_lambda.item() != before and all(torch.isfinite(p).all() for p in model.parameters())


def test_off_builds_no_lambda_and_is_the_same_model():
    t = tokens()
    off = randomised_model(tiny_config(num_layers=4))
    assert off.backout_lambda is None
    assert torch.equal(off(t[:-1], t[1:], torch.tensor(2)),
                       randomised_model(tiny_config(num_layers=4, backout_layer=-1))(t[:-1], t[1:], torch.tensor(2)))


def test_backout_traces_as_one_graph():
    model = randomised_model(tiny_config(num_layers=4, backout_layer=1, attn_input_layer=1))
    t = tokens()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(t[:-1], t[1:], torch.tensor(2))
    loss.backward()
    torch.testing.assert_close(loss, model(t[:-1], t[1:], torch.tensor(2)))
    assert model.backout_lambda.grad is not None


@pytest.mark.parametrize("value", [-2, 11, 12])
def test_backout_layer_is_validated_naming_the_key(value):
    with pytest.raises(ValueError, match="^backout_layer: must be -1 \\(off\\) or a layer before the last"):
        TrainConfig(backout_layer=value).validate()
    assert TrainConfig(backout_layer=8).validate().backout_layer == 8


def test_backout_is_refused_with_mudd_which_has_its_own():
    with pytest.raises(ValueError, match="^backout_layer: mudd has its own backout"):
        TrainConfig(backout_layer=8, mudd=True).validate()
