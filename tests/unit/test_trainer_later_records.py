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
