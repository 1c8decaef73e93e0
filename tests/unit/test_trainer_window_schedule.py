"""The attention window by phases (window_schedule), record-31's YaRN at each of its changes (yarn) and the longer
window of the last validation (final_val_window_blocks), issue 22. The schedule is a pure function of the step, the
YaRN state is the record's arithmetic folded over the window's changes, it reaches every layer's rotary tables as
data (no recompile), and a run carries all three through training, validation and a resume."""
import json
import math

import pytest

torch = pytest.importorskip("torch")

from orchestrator.data.synthetic import markov_shards  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.fixtures import tiny_config  # noqa: E402
from trainer.layers import Rotary  # noqa: E402
from trainer.schedules import val_window_blocks, window_blocks, window_changes, yarn_scales  # noqa: E402
from trainer.train import Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

RECORD = dict(window_schedule="1/3:3,2/3:7,1:11", steps=1270)   # the current record's long windows, by thirds


def record_yarn(freqs: list[float], windows: list[int], block: int = 128) -> tuple[list[float], float]:
    """The record's Yarn.apply, one frequency at a time in Python floats, over a sequence of long windows (blocks)."""
    f, scale = list(freqs), 1.0
    for old, new in zip(windows, windows[1:]):
        old_t, new_t = old * block, new * block
        for i, x in enumerate(f):
            rotations = old_t * x / (2 * math.pi)
            weight = min(max((rotations - 1) / (32 - 1), 0.0), 1.0)
            f[i] = x * (old_t / new_t + weight * (1 - old_t / new_t))
        scale *= 0.2 * math.log(new_t / old_t) + 1
    return f, scale


def test_the_window_follows_its_phases_and_the_last_validation_may_look_further():
    cfg = TrainConfig(**RECORD, final_val_window_blocks=20).validate()
    assert [window_blocks(cfg, s) for s in (0, 423, 424, 846, 847, 1269)] == [3, 3, 7, 7, 11, 11]
    assert window_changes(cfg) == [(424, 3, 7), (847, 7, 11)]
    assert val_window_blocks(cfg, 847) == 11 and val_window_blocks(cfg, 1270) == 20
    plain = TrainConfig(steps=1270).validate()   # without a schedule: record-28's linear growth, as before
    assert [window_blocks(plain, s) for s in (0, 635, 1269)] == [1, 7, 14]
    assert val_window_blocks(plain, 1270) == window_blocks(plain, 1270)


@pytest.mark.parametrize("overrides, words", [
    (dict(window_schedule="1/3:3,1/2:7"), "last phase must end at 1"),
    (dict(window_schedule="1/3:0,1:7"), "BLOCKS within 1"),
    (dict(window_schedule="third:3"), "is not END:BLOCKS"),
    (dict(final_val_window_blocks=-1), "final_val_window_blocks: must be >= 0"),
])
def test_a_bad_window_setting_is_refused_naming_the_key(overrides, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(**overrides).validate()


def test_yarn_is_the_records_arithmetic_at_each_change_of_the_window():
    cfg = TrainConfig(**RECORD, yarn=True).validate()
    freqs = Rotary(128).freqs
    for step, windows in [(0, [3]), (424, [3, 7]), (900, [3, 7, 11]), (1269, [3, 7, 11])]:
        factors, scale = yarn_scales(cfg, freqs, step)
        want, want_scale = record_yarn(freqs.tolist(), windows)
        got = (freqs.double() * factors.double()).tolist()
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12) and scale == pytest.approx(want_scale, rel=1e-12)
    factors, scale = yarn_scales(cfg, freqs, 1269)
    assert factors[0] == 1.0   # the fastest frequency turns more than 32 times over 384 tokens: left alone
    assert factors[31] == pytest.approx(3 / 11, rel=1e-5)   # the slowest turns under once: slowed by 3/7 x 7/11
    assert (factors[32:] == 1).all()   # the unrotated half stays unrotated
    assert scale == pytest.approx((0.2 * math.log(7 / 3) + 1) * (0.2 * math.log(11 / 7) + 1))
    off = yarn_scales(TrainConfig(**RECORD).validate(), freqs, 1269)
    assert (off[0] == 1).all() and off[1] == 1.0


def test_the_yarn_state_scales_the_attention_logits_and_turns_the_rotation():
    rotary = Rotary(16)
    q, k = torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
    base = (rotary(q) * rotary(k)).sum(-1)
    rotary.set_yarn(torch.ones(8), 1.7)
    assert torch.allclose((rotary(q) * rotary(k)).sum(-1), 1.7 * base, rtol=1e-5, atol=1e-5)
    slower = torch.ones(8)
    slower[3] = 0.5
    rotary.set_yarn(slower, 1.0)
    cos, _ = rotary.tables(40, torch.device("cpu"))
    assert torch.allclose(cos[:, 3], torch.cos(torch.arange(40.0) * rotary.freqs[3] * 0.5))
    rotary.set_yarn(torch.ones(8), 1.0)
    assert torch.equal((rotary(q) * rotary(k)).sum(-1), base)   # all ones: exactly the fixed rotation


def test_a_new_yarn_state_is_new_data_for_the_compiled_model_not_a_recompile():
    from trainer.fixtures import randomised_model

    model = randomised_model(tiny_config(num_layers=4))   # no zero projections: attention reaches the loss
    t = torch.randint(0, 50000, (513,))
    t[0] = 50256
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    before = compiled(t[:-1], t[1:], torch.tensor(2)).item()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for m in model.modules():
            if isinstance(m, Rotary):
                m.set_yarn(torch.full_like(m.freqs, 0.5), 1.3)
        after = compiled(t[:-1], t[1:], torch.tensor(2)).item()
    assert after != before and after == pytest.approx(model(t[:-1], t[1:], torch.tensor(2)).item(), rel=1e-5)


def test_a_run_sets_the_steps_yarn_state_in_every_layer_and_validates_further_at_the_end(tmp_path):
    markov_shards(tmp_path / "data")
    cfg = tiny_config(steps=6, val_every=3, val_tokens=1024, window_schedule="1/2:1,1:3", yarn=True,
                      final_val_window_blocks=4, attn_prep="torch")   # the torch path: a Rotary per layer
    trainer = Trainer(cfg, str(tmp_path / "data"), str(tmp_path / "out"))
    assert trainer.run() == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["window"] for r in rows if "train_loss" in r] == [1, 1, 1, 3, 3, 3]
    assert [(r["step"], r["window"]) for r in rows if "val_loss" in r] == [(0, 1), (3, 3), (6, 4)]
    want, scale = yarn_scales(cfg, Rotary(cfg.head_dim).freqs, 5)
    rotaries = [m for m in trainer.model.modules() if isinstance(m, Rotary)]
    assert len(rotaries) == 2 and scale == pytest.approx(0.2 * math.log(3) + 1)
    for rotary in rotaries:
        assert torch.allclose(rotary.yarn_freqs, want) and rotary.yarn_attn.item() == pytest.approx(scale)
    # a resumed trainer at the step before the change holds no YaRN state until a step asks for it, then the step's
    trainer.set_yarn(2)
    assert all((r.yarn_freqs == 1).all() and r.yarn_attn.item() == 1.0 for r in rotaries)


def test_the_last_validations_longer_window_leaves_the_short_windows_at_the_trainings(monkeypatch):
    """The record's last validation: long windows of 20 blocks, short ones still at the training's (half of its
    longest long window); without final_val_window_blocks the short window is half the long one, as in training."""
    import torch

    from trainer import attention as attn_impl
    from trainer.data import BOS
    from trainer.fixtures import randomised_model

    seen = []
    real = attn_impl.attend
    monkeypatch.setattr(attn_impl, "attend", lambda *a: seen.append(int(a[5])) or real(*a))
    t = torch.randint(0, BOS, (513,), generator=torch.Generator().manual_seed(0))
    t[0] = BOS
    for final, want in ((0, [20, 20, 10]), (20, [20, 20, 3])):
        cfg = tiny_config(num_layers=3, window_schedule="1/2:3,1:7", final_val_window_blocks=final, attn_skip_layers="")
        model = randomised_model(cfg)
        seen.clear()
        with torch.no_grad():
            model(t[:-1], t[1:], torch.tensor(20))
        assert sorted(seen, reverse=True) == want   # the first and last layers' long windows, the middle's short
        seen.clear()
        with torch.no_grad():
            model(t[:-1], t[1:], torch.tensor(7))   # training's last window: the same with or without it
        assert sorted(seen, reverse=True) == [7, 7, 3]
