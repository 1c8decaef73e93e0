"""Record-81's multiway dynamic dense connections (TrainConfig.mudd, trainer/mudd.py): the coefficient net is the
record's, token by token; at init the model is the plain one with only the backout (final residual minus half of
layer 2L/3's output); the value term reaches the last layer's attention values at weight 1; the model stays causal;
the nets train in their own Adam group; bad settings are refused naming the key."""
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from trainer.data import BOS  # noqa: E402
from trainer.fixtures import packed_tokens, randomised_model, tiny_config  # noqa: E402


def tokens(T=512, starts=(0, 200), seed=3):
    return packed_tokens(T + 1, starts, seed)


def randomise(net, seed=1):
    """Every coefficient away from its init (W2 and the biases are zero or near it there)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_saved_layers_are_a_third_and_two_thirds_in():
    from trainer.mudd import saved_layers

    assert saved_layers(12) == (4, 8)   # the record's 3 and 7 of 11, one layer on
    assert saved_layers(4) == (1, 2)


def test_the_coefficients_and_both_places_are_the_records_sums_token_by_token():
    from trainer.mudd import DenseConnections

    torch.manual_seed(0)
    net = DenseConnections(16)
    randomise(net)
    x, x0, late, last_in, ve, early = (torch.randn(1, 5, 16) for _ in range(6))
    new_x, values = net.before_last(x, x0, late)
    after = net.after_last(x, x0, late, last_in, ve, early)
    for t in range(5):   # one token at a time: m = 0.1 (W2 gelu(W1 x_t) + b)
        m0 = 0.1 * (net.w2[0] @ F.gelu(net.w1[0] @ x[0, t]) + net.b2[0])
        m1 = 0.1 * (net.w2[1, :5] @ F.gelu(net.w1[1] @ x[0, t]) + net.b2[1, :5])
        want_v = m0[0] * x0[0, t] + m0[1] * late[0, t] + m0[2] * x[0, t]
        want_x = (1 + m0[5]) * x[0, t] + m0[3] * x0[0, t] + m0[4] * late[0, t]
        want_after = (x[0, t] + m1[0] * x0[0, t] + m1[1] * late[0, t] + m1[2] * last_in[0, t] + m1[3] * ve[0, t]
                      + m1[4] * early[0, t])
        assert torch.allclose(values[0, t], want_v, atol=1e-5)
        assert torch.allclose(new_x[0, t], want_x, atol=1e-5)
        assert torch.allclose(after[0, t], want_after, atol=1e-5)
    # no value embedding: its term is dropped, the rest unchanged
    without = net.after_last(x, x0, late, last_in, None, early)
    m3 = 0.1 * (F.linear(F.gelu(F.linear(x, net.w1[1])), net.w2[1, 3:4]) + net.b2[1, 3])
    assert torch.allclose(without + m3 * ve, after, atol=1e-5)


def final_hidden(model, t):
    """The residual the head reads (before its norm), through the torch path's one call of model.logits."""
    from trainer.model import GPT

    seen = []
    model.logits = lambda x: (seen.append(x.detach()), GPT.logits(model, x))[1]
    loss = model(t[:-1], t[1:], torch.tensor(2))
    del model.logits
    return loss, seen[0]


def test_at_init_the_model_is_the_plain_one_minus_half_the_late_layers_output():
    from trainer.model import GPT
    from trainer.mudd import saved_layers

    plain = randomised_model(tiny_config(num_layers=4))
    model = GPT(tiny_config(num_layers=4, mudd=True))
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["mudd.b2", "mudd.w1", "mudd.w2"] and not unexpected
    late = saved_layers(4)[1]
    outputs = []
    plain.blocks[late].register_forward_hook(lambda mod, args, out: outputs.append(out.detach()))
    t = tokens()
    _, x_plain = final_hidden(plain, t)
    loss, x_mudd = final_hidden(model, t)
    assert torch.allclose(x_mudd, x_plain - 0.5 * outputs[0][0], atol=1e-6)
    loss.backward()
    # W2 starts at zero, so W1 learns only once W2 has moved; W2 and the biases learn from the first step
    assert model.mudd.w2.grad.abs().sum() > 0 and model.mudd.b2.grad[0].abs().sum() > 0
    assert not model.mudd.w1.grad.any()


def test_without_the_backout_the_model_starts_as_the_plain_one():
    from trainer.model import GPT

    plain = randomised_model(tiny_config(num_layers=4))
    model = GPT(tiny_config(num_layers=4, mudd=True, mudd_backout=0.0))
    model.load_state_dict(plain.state_dict(), strict=False)
    t = tokens()
    assert torch.allclose(final_hidden(model, t)[1], final_hidden(plain, t)[1], atol=1e-6)


def test_the_value_term_enters_the_attention_values_at_weight_one():
    """Attention is linear in its values: adding e to them is a value embedding raised by e / lambda_1."""
    from trainer import attention as attn_impl
    from trainer.layers import norm

    model = randomised_model(tiny_config(num_layers=4, mudd=True))
    attn = model.blocks[-1].attn
    t = tokens()[:256]
    docs = attn_impl.document_ids(t)
    x = norm(torch.randn(1, 256, 64))
    ve, e = torch.randn(1, 256, 64), torch.randn(1, 256, 64)
    lam1 = attn.lambdas[1].detach()
    with torch.no_grad():
        got = attn(x, ve, docs, 2, 128, None, extra_v=e)
        assert torch.allclose(got, attn(x, ve + e / lam1, docs, 2, 128, None), atol=1e-5)
        assert torch.allclose(attn(x, None, docs, 2, 128, None, extra_v=e), attn(x, e / lam1, docs, 2, 128, None),
                              atol=1e-5)
        assert not torch.allclose(got, attn(x, ve, docs, 2, 128, None), atol=1e-3)


def test_with_every_coefficient_moved_the_model_stays_causal():
    model = randomised_model(tiny_config(num_layers=4, mudd=True))
    randomise(model.mudd)
    t = tokens()
    changed = t.clone()
    changed[300:] = (changed[300:] + 7) % BOS
    a, b = (model(s[:-1], s[1:], torch.tensor(4), reduction="none").detach() for s in (t, changed))
    assert torch.equal(a[:299], b[:299]) and not torch.equal(a[299:], b[299:])


def test_the_nets_train_in_their_own_adam_group_at_the_records_lr_and_betas():
    from trainer.optim import build_optimizers

    cfg = tiny_config(num_layers=4, mudd=True)
    model = randomised_model(cfg)
    adam, muon = build_optimizers(model, cfg)
    group = next(g for g in adam.param_groups if any(p is model.mudd.w1 for p in g["params"]))
    assert {id(p) for p in group["params"]} == {id(p) for p in model.mudd.parameters()}
    assert group["lr"] == pytest.approx(0.002) and group["betas"] == (0.9, 0.99)
    ids = [id(p) for opt in (adam, muon) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    t = tokens()
    model(t[:-1], t[1:], torch.tensor(2)).backward()
    before = model.mudd.b2.detach().clone()
    adam.step()
    assert not torch.equal(before, model.mudd.b2)


@pytest.mark.parametrize("overrides, words", [
    (dict(num_layers=4, head_dim=16), "num_heads x head_dim = model_dim"),
    (dict(num_layers=3), "num_layers >= 4"),
    (dict(num_layers=4, attn_skip_layers="3"), "take it out of attn_skip_layers"),
])
def test_a_model_the_connections_cannot_fit_is_refused_naming_the_key(overrides, words):
    with pytest.raises(ValueError, match="^mudd: ") as e:
        tiny_config(mudd=True, **overrides)
    assert words in str(e.value)
