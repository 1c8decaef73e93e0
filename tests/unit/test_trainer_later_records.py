"""Techniques of records after record-28, each behind its own TrainConfig switch, off by default (issue 22):
with every switch off the trainer computes what it computed before them; each switch, on, computes what its
record specifies."""
import hashlib

import pytest

torch = pytest.importorskip("torch")

from trainer.data import BOS  # noqa: E402
from trainer.fixtures import randomised_model, tiny_config  # noqa: E402
from trainer.optim import build_optimizers  # noqa: E402

# sha256 of the state after one forward, backward, Adam and Muon step of the default tiny model (below),
# computed at 075632d, before any of these switches existed (CPU torch, one thread)
BEFORE_SWITCHES = ("0x1.5d1b980000000p+3", "919f5008bd31cfd332d67865751f72cf3ea2c91b781eacb015916b4f4eeef9ec")


def tokens(T=512, starts=(0, 200), seed=3):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, BOS, (T + 1,), generator=g)
    t[list(starts)] = BOS
    return t


def with_switches(**switches):
    """(a randomised default tiny model, the same model with these switches on and their new parts as built)."""
    from trainer.model import GPT

    plain = randomised_model(tiny_config())
    model = GPT(tiny_config(**switches))
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert missing and not unexpected
    return plain, model


def one_step_digest(cfg) -> tuple[str, str]:
    """(the loss as a float hex, sha256 of the state dict) after one training step on fixed tokens."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a reduction split over threads may round differently
    try:
        model = randomised_model(cfg)
        t = tokens()
        loss = model(t[:-1], t[1:], torch.tensor(2))
        loss.backward()
        adam, muon = build_optimizers(model, cfg)
        adam.step()
        muon.step()
    finally:
        torch.set_num_threads(threads)
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return loss.item().hex(), h.hexdigest()


def test_with_every_switch_off_one_step_is_bit_identical_to_before_the_switches():
    assert one_step_digest(tiny_config(num_layers=4, num_value_embeds=1)) == BEFORE_SWITCHES


def test_the_defaults_build_none_of_the_later_records_parts():
    model = randomised_model(tiny_config())
    assert model.smear is None


# ------------------------------------------------------------------------------------ smear (record-34)


def test_smear_adds_a_gated_share_of_the_previous_embedding():
    from trainer.embeddings import Smear

    torch.manual_seed(0)
    smear = Smear(dims=12)
    with torch.no_grad():
        smear.gate.normal_()
        smear.lam.fill_(0.7)
    e = torch.randn(50, 64)
    want = e.clone()
    for t in range(1, 50):   # one token at a time, in plain torch
        want[t] = e[t] + 0.7 * torch.sigmoid(e[t, :12] @ smear.gate[0]) * e[t - 1]
    assert torch.allclose(smear(e), want, atol=1e-6)


def test_smear_starts_as_a_no_op_and_learns_through_its_lambda_then_its_gate():
    t = tokens()
    plain, smeared = with_switches(smear=True)
    loss = smeared(t[:-1], t[1:], torch.tensor(2))
    assert torch.equal(loss, plain(t[:-1], t[1:], torch.tensor(2)))   # lam = 0: every embedding unchanged
    loss.backward()
    assert smeared.smear.lam.grad.abs().sum() > 0
    with torch.no_grad():
        smeared.smear.lam.fill_(0.5)
    smeared.zero_grad()
    loss = smeared(t[:-1], t[1:], torch.tensor(2))
    loss.backward()
    assert not torch.equal(loss, plain(t[:-1], t[1:], torch.tensor(2)))
    assert smeared.smear.gate.grad.abs().sum() > 0


def test_smear_keeps_the_model_causal():
    model = randomised_model(tiny_config(smear=True))
    with torch.no_grad():
        model.smear.lam.fill_(0.5)
    t = tokens()
    changed = t.clone()
    changed[300:] = (changed[300:] + 7) % BOS
    a, b = (model(s[:-1], s[1:], torch.tensor(4), reduction="none").detach() for s in (t, changed))
    assert torch.equal(a[:299], b[:299]) and not torch.equal(a[299:], b[299:])


def test_smear_gate_is_trained_by_muon_and_its_lambda_by_adam_with_the_scalars():
    from trainer.optim import split_parameters

    model = randomised_model(tiny_config(smear=True))
    parts = split_parameters(model)
    assert any(p is model.smear.gate for p in parts["hidden"])
    assert any(p is model.smear.lam for p in parts["scalars"])
