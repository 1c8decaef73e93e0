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
    assert model.smear is None and model.bigram is None and model.bigram_lambdas is None


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


# ----------------------------------------------------------------------- bigram hash embedding (record-62/83)


def test_bigram_hash_is_the_records_int32_arithmetic():
    import numpy as np

    from trainer.embeddings import bigram_hash

    t = tokens(T=2000).numpy()
    t[5] = BOS   # the largest token: the products stay below 2^31
    rows = 50304 * 15
    x = t.astype(np.int32)
    want = np.empty_like(x)
    want[0] = rows - 1
    want[1:] = np.bitwise_xor(np.int32(36313) * x[1:], np.int32(27191) * x[:-1]) % np.int32(rows - 1)
    got = bigram_hash(torch.from_numpy(t), rows)
    assert np.array_equal(got.numpy(), want) and got.max() < rows


def test_bigram_embedding_is_the_hashed_row_times_its_sign_row():
    from trainer.embeddings import BigramHash, bigram_hash

    torch.manual_seed(0)
    emb = BigramHash(rows=101, dim=8, sign_rows=16)
    with torch.no_grad():
        emb.table.weight.normal_()
    assert set(emb.signs.unique().tolist()) == {-1.0, 1.0}
    t = tokens(T=300)
    h = bigram_hash(t, 101)
    got = emb(t)
    for i in range(len(t)):
        sign_row = 0 if i == 0 else int(t[i - 1] ^ t[i]) % 16
        assert torch.equal(got[i], emb.table.weight[h[i]] * emb.signs[sign_row])


def test_bigram_embedding_starts_as_a_no_op_and_its_table_gets_gradients():
    t = tokens()
    plain, model = with_switches(bigram_embed=True, bigram_rows=1021, bigram_dim=16)
    loss = model(t[:-1], t[1:], torch.tensor(2))
    assert torch.equal(loss, plain(t[:-1], t[1:], torch.tensor(2)))   # the table starts at zero
    loss.backward()
    used = torch.zeros(1021, dtype=torch.bool)
    from trainer.embeddings import bigram_hash

    used[bigram_hash(t[:-1], 1021)] = True
    row_grad = model.bigram.table.weight.grad.abs().sum(1)
    assert (row_grad[used] > 0).all() and not row_grad[~used].any()
    assert model.bigram.table.weight.shape == (1021, 16)


def test_each_block_gets_its_weighted_bigram_embedding_on_the_first_bigram_dims():
    import torch.nn.functional as F

    model = randomised_model(tiny_config(bigram_embed=True, bigram_rows=1021, bigram_dim=16))
    with torch.no_grad():
        model.bigram.table.weight.normal_()
        model.bigram_lambdas.copy_(torch.tensor([0.3, -0.2]))
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[7]))
    t = tokens()
    model(t[:-1], t[1:], torch.tensor(2))
    e = model.bigram(t[:-1])[None]
    for i, got in enumerate(seen):
        assert torch.equal(got, model.bigram_lambdas[i] * F.pad(e, (0, 64 - 16)))


def test_bigram_embedding_keeps_the_model_causal_and_its_parameters_sit_with_adams_embeddings_and_scalars():
    from trainer.optim import split_parameters

    model = randomised_model(tiny_config(bigram_embed=True, bigram_rows=1021, bigram_dim=16))
    with torch.no_grad():
        model.bigram.table.weight.normal_()
    t = tokens()
    changed = t.clone()
    changed[300:] = (changed[300:] + 7) % BOS
    a, b = (model(s[:-1], s[1:], torch.tensor(4), reduction="none").detach() for s in (t, changed))
    assert torch.equal(a[:299], b[:299]) and not torch.equal(a[299:], b[299:])
    parts = split_parameters(model)
    assert any(p is model.bigram.table.weight for p in parts["embed"])
    assert any(p is model.bigram_lambdas for p in parts["scalars"])
