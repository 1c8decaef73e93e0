"""Record-89's extension (extension_steps, extension_window_blocks), issue 22: steps after the scheduled ones at the
cool-down's end with a longer window, the momentum cool-down ending with them, and a run that trains, logs and
validates them as the record does."""
import json

import pytest

torch = pytest.importorskip("torch")

from orchestrator.data.synthetic import markov_shards  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.fixtures import tiny_config  # noqa: E402
from trainer.schedules import lr_scale, muon_momentum, val_window_blocks, window_blocks, window_changes  # noqa: E402
from trainer.train import Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# the current record's schedule: 1270 steps by thirds, then 15 at the final lr with windows 13 (short 6), the last
# validation at 20; its lr multipliers by stage and the cool-down over the last 0.60 to 0.15
RECORD89 = dict(steps=1270, extension_steps=15, window_schedule="1/3:3,2/3:7,1:11", extension_window_blocks=13,
                final_val_window_blocks=20, lr_floor=0.15, cooldown_frac=0.6, batch_lr_scales="1,1.52,1.73",
                muon_momentum_cooldown_steps=50)


def record_lr(step: int) -> float:
    """The record's TrainingSchedule.get_lr in its own units (the first stage's lr = 1), for its 1270 + 15 steps."""
    ends = [0, round(1270 / 3), round(1270 * (1 / 3 + 1 / 3)), 1270, 1285]
    mul = next((m for m, end in zip((1.0, 1.52, 1.73, 1.0), ends[1:]) if step < end), 1.0)
    start = int(1270 * (1 - 0.6))
    if step >= start:
        t = min(1.0, (step - start) / (1270 - start))
        mul = mul * (1 - t) + 0.15 * t
    return mul


def record_momentum(step: int) -> float:
    """The record's get_muon_momentum: up from 0.85 over 300 steps, down again over the run's last 50."""
    if step < 300:
        return 0.85 + step / 300 * 0.10
    if step > 1285 - 50:
        return 0.95 - (step - 1235) / 50 * 0.10
    return 0.95


def test_the_extension_trains_at_the_cool_downs_end_with_the_records_windows_and_momentum():
    cfg = TrainConfig(**RECORD89).validate()
    assert cfg.total_steps() == 1285
    first = lr_scale(cfg, 0)   # ours are over the last stage's multiplier; the record's over the first's
    for step in (0, 500, 508, 900, 1269, 1270, 1284):
        assert lr_scale(cfg, step) / first == pytest.approx(record_lr(step), rel=1e-9), step
    assert [window_blocks(cfg, s) for s in (1269, 1270, 1284)] == [11, 13, 13]
    assert window_changes(cfg)[-1] == (1270, 11, 13)   # YaRN rescales at the extension's window too
    assert val_window_blocks(cfg, 1270) == 13 and val_window_blocks(cfg, 1285) == 20
    for step in (0, 299, 1235, 1236, 1270, 1285):
        assert muon_momentum(cfg, step) == pytest.approx(record_momentum(step), abs=1e-12), step


def test_without_an_extension_nothing_moves_and_no_cool_down_is_a_flat_lr_to_the_end():
    plain = TrainConfig(steps=1270, window_schedule="1/3:3,2/3:7,1:11", final_val_window_blocks=20,
                        muon_momentum_cooldown_steps=50).validate()
    assert plain.total_steps() == 1270 and window_blocks(plain, 1270) == 11 and val_window_blocks(plain, 1270) == 20
    assert muon_momentum(plain, 1270) == pytest.approx(0.85)
    flat = TrainConfig(steps=100, cooldown_frac=0.0, seq_len_schedule="", batch_lr_scales="").validate()
    assert [lr_scale(flat, s) for s in (0, 99, 100)] == [1.0, 1.0, 1.0]   # the last validation's row divided by 0


@pytest.mark.parametrize("key", ["extension_steps", "extension_window_blocks"])
def test_a_negative_extension_is_refused_naming_the_key(key):
    with pytest.raises(ValueError, match=f"{key}.*must be >= 0"):
        TrainConfig(**{key: -1}).validate()


def test_a_run_trains_logs_and_validates_its_extension_steps(tmp_path, capsys):
    markov_shards(tmp_path / "data")
    cfg = tiny_config(steps=4, extension_steps=2, val_every=3, val_tokens=1024, window_schedule="1/2:1,1:2",
                      extension_window_blocks=3, final_val_window_blocks=4, yarn=True, lr_floor=0.2,
                      cooldown_frac=0.5)
    trainer = Trainer(cfg, str(tmp_path / "data"), str(tmp_path / "out"))
    assert trainer.run() == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["window"] for r in train] == [1, 1, 2, 2, 3, 3]
    assert [r["lr_scale"] for r in train][-3:] == [pytest.approx(0.6), 0.2, 0.2]
    assert [(r["step"], r["window"]) for r in rows if "val_loss" in r] == [(0, 1), (3, 2), (6, 4)]
    log = capsys.readouterr().out
    assert "step:6/6 val_loss:" in log and "step:5/6 train_loss:" in log and "/4 " not in log
    timings = json.loads((tmp_path / "out" / "trainer_timings.json").read_text())
    assert timings["total_steps"] == 6 and timings["steps_done"] == 6
    assert trainer.yarn_applied == 2   # the schedule's change at step 2 and the extension's at step 4
