"""record-53's multi-token prediction and record-88's prefix-token loss (issue 22): the weights over training are
the records', the model's loss is the weighted sum of the next tokens' (and the next token's prefix's)
cross-entropies from the same logits, and a run with them trains and logs the weights."""
import base64
import json

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from orchestrator.data.synthetic import markov_shards  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.fixtures import randomised_model, tiny_config  # noqa: E402
from trainer.model import future_targets  # noqa: E402
from trainer.schedules import loss_weights, mtp_weights, prefix_weight  # noqa: E402
from trainer.train import Trainer  # noqa: E402
from trainer.vocab import gpt2_ranks, prefix_table  # noqa: E402


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def record_mtp(step: int, steps: int) -> list[float]:
    """The record's TrainingManager, as its script states it: stage ends at round(c * steps) for the cumulative
    durations 1/3, 2/3; t the fraction of the stage done; weights start + (end - start) * t, stage by stage
    [1, .5, .25] -> [1, .5, 0], [1, .5] -> [1, 0], [1] -> [1]; zero-padded to three here."""
    ends = [0, round(1 / 3 * steps), round((1 / 3 + 1 / 3) * steps), steps]
    stages = [([1.0, 0.5, 0.25], [1.0, 0.5, 0.0]), ([1.0, 0.5], [1.0, 0.0]), ([1.0], [1.0])]
    for i in range(3):
        if step < ends[i + 1]:
            t = (step - ends[i]) / (ends[i + 1] - ends[i])
            w = [a + (b - a) * t for a, b in zip(*stages[i])]
            return w + [0.0] * (3 - len(w))
    return [1.0, 0.0, 0.0]


@pytest.mark.parametrize("steps", [2120, 1545, 200, 10])
def test_the_weights_are_the_records_by_thirds(steps):
    cfg = TrainConfig(steps=steps, multi_token_prediction=True).validate()
    for s in range(steps + 2):
        assert list(mtp_weights(cfg, s)) == pytest.approx(record_mtp(s, steps), abs=1e-12), s
    assert mtp_weights(cfg, 0) == (1.0, 0.5, 0.25)
    assert mtp_weights(TrainConfig(steps=steps), 0) == ()
    # the third token's weight has run down to 0 when the second third begins, the second's when the last does
    assert mtp_weights(cfg, round(steps / 3))[2] == 0.0 and mtp_weights(cfg, round(2 * steps / 3))[1:] == (0.0, 0.0)


def test_future_targets_shift_each_column_and_ignore_past_the_end():
    t = torch.tensor([5, 6, 7, 8])
    assert future_targets(t, 3).tolist() == [[5, 6, 7], [6, 7, 8], [7, 8, -1], [8, -1, -1]]
    assert future_targets(t, 1).tolist() == [[5], [6], [7], [8]]


def test_the_loss_is_the_weighted_sum_of_the_next_tokens_cross_entropies():
    cfg = tiny_config(multi_token_prediction=True)
    model = randomised_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (cfg.seq_len + 1,), generator=torch.Generator().manual_seed(3))
    window = torch.tensor(2)
    weights = torch.tensor([1.0, 0.5, 0.25])
    loss = model(tokens[:-1], tokens[1:], window, target_weights=weights)
    plain = model(tokens[:-1], tokens[1:], window)
    with torch.no_grad():
        logits = model.logits(model_hidden(model, tokens[:-1], window))
    T = cfg.seq_len
    want = sum(w * F.cross_entropy(logits[: T - k], tokens[1 + k:], reduction="sum") for k, w in enumerate([1.0, 0.5, 0.25])) / T
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(tokens[:-1], tokens[1:], window, target_weights=torch.tensor([1.0, 0.0, 0.0])),
                               plain, rtol=1e-6, atol=1e-7)
    loss.backward()   # and it has a gradient through the same head
    assert model.lm_head.weight.grad.abs().sum() > 0


def model_hidden(model, tokens, window):
    """The final hidden states: the model's forward up to the head, caught at its loss."""
    seen = {}
    original = model.summed_loss

    def catch(x, targets, weights=None):
        seen["x"] = x
        return original(x, targets, weights)

    model.summed_loss = catch
    try:
        model(tokens, tokens, window, target_weights=torch.ones(1 if model.prefix_table is None else 2))
    finally:
        model.summed_loss = original
    return seen["x"]


def test_a_run_with_it_trains_and_logs_the_weights(tmp_path):
    markov_shards(tmp_path / "data")
    cfg = tiny_config(multi_token_prediction=True, steps=6, val_every=6, val_tokens=1024)
    assert Trainer(cfg, str(tmp_path / "data"), str(tmp_path / "a")).run() == 0
    rows = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if "train_loss" in r}
    assert [train[s]["loss_weights"] for s in (1, 3, 5)] == [[1.0, 0.5, 0.25], [1.0, 0.5, 0.0], [1.0, 0.0, 0.0]]
    plain = tiny_config(steps=6, val_every=6, val_tokens=1024)
    assert Trainer(plain, str(tmp_path / "data"), str(tmp_path / "b")).run() == 0
    plain_rows = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    first = [r["train_loss"] for r in rows if r.get("step") == 1 and "train_loss" in r][0]
    plain_first = [r["train_loss"] for r in plain_rows if r.get("step") == 1 and "train_loss" in r][0]
    assert first == pytest.approx(1.75 * plain_first, rel=0.02)   # the objective: 1 + 0.5 + 0.25 times a CE at init
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    plain_val = [r["val_loss"] for r in plain_rows if "val_loss" in r]
    assert val[0] == plain_val[0] and val[-1] != plain_val[-1]   # validation is plain CE; training took another path


# ------------------------------------------------------------------------------------------ the prefix target

def toy_vocab_file(tmp_path):
    """A byte-level BPE with a few merges, as an r50k_base.tiktoken file: ids 256-260 are th, the, " the", en, end."""
    tokens = [bytes([b]) for b in range(256)] + [b"th", b"the", b" the", b"en", b"end"]
    path = tmp_path / "toy.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


def test_the_prefix_table_holds_each_tokens_longest_proper_prefix_token(tmp_path):
    ranks = {b"a": 0, b"b": 1, b"ab": 2, b"abc": 3, b"abd": 4, b"x": 5, b"abcd": 6, b"abcde": 9}
    assert prefix_table(ranks, 8).tolist() == [-1, -1, 0, 2, 2, -1, 3, -1]   # id 9 is past the table; 7 unused
    toy = prefix_table(gpt2_ranks(str(toy_vocab_file(tmp_path))), 50257)
    assert toy[256:261].tolist() == [ord("t"), 256, ord(" "), ord("e"), 259]   # " the": " th" and " t" are no tokens
    assert (toy[:256] == -1).all() and (toy[261:] == -1).all()


def test_a_vocabulary_that_cannot_be_read_is_one_sentence_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"^vocab_file: the GPT-2 vocabulary could not be read from .*nowhere.tiktoken "
                                         r"\(FileNotFoundError\); set vocab_file to a local r50k_base.tiktoken"):
        gpt2_ranks(str(tmp_path / "nowhere.tiktoken"))
    (tmp_path / "bad.tiktoken").write_text("not base64 at all\n")
    with pytest.raises(ValueError, match="^vocab_file: .*bad.tiktoken"):
        gpt2_ranks(str(tmp_path / "bad.tiktoken"))
    markov_shards(tmp_path / "data")
    cfg = tiny_config(prefix_token_loss=True, vocab_file=str(tmp_path / "nowhere.tiktoken"))
    with pytest.raises(ValueError, match="^vocab_file"):   # at the trainer's start, before a model is built
        Trainer(cfg, str(tmp_path / "data"), str(tmp_path / "out"))


def record_prefix_weight(step: int, steps: int) -> float:
    """The record's stages as its script states them: prefix_weight 0.25 -> 0.25, 0.25 -> 0, 0 -> 0."""
    ends = [0, round(1 / 3 * steps), round((1 / 3 + 1 / 3) * steps), steps]
    for (start, end), (a, b) in zip(zip(ends, ends[1:]), [(0.25, 0.25), (0.25, 0.0), (0.0, 0.0)]):
        if step < end:
            return a + (b - a) * (step - start) / (end - start)
    return 0.0


@pytest.mark.parametrize("steps", [2120, 200, 10])
def test_the_prefix_weight_is_the_records_and_joins_the_next_tokens_weights(steps):
    cfg = TrainConfig(steps=steps, prefix_token_loss=True).validate()
    assert [prefix_weight(cfg, s) for s in range(steps + 2)] == \
        pytest.approx([record_prefix_weight(s, steps) for s in range(steps + 2)], abs=1e-12)
    both = TrainConfig(steps=steps, prefix_token_loss=True, multi_token_prediction=True).validate()
    assert loss_weights(both, 0) == (1.0, 0.5, 0.25, 0.25)
    assert loss_weights(cfg, 0) == (1.0, 0.25) and loss_weights(cfg, steps) == (1.0, 0.0)
    assert loss_weights(TrainConfig(steps=steps), 0) == () and prefix_weight(TrainConfig(steps=steps), 0) == 0.0


def test_the_prefix_target_adds_its_weighted_cross_entropy(tmp_path):
    cfg = tiny_config(prefix_token_loss=True)
    model = randomised_model(cfg)
    model.prefix_table.copy_(torch.from_numpy(prefix_table(gpt2_ranks(str(toy_vocab_file(tmp_path))), cfg.vocab_size)))
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(250, 261, (cfg.seq_len + 1,), generator=g)   # about half have a prefix token
    window, T = torch.tensor(2), cfg.seq_len
    loss = model(tokens[:-1], tokens[1:], window, target_weights=torch.tensor([1.0, 0.25]))
    with torch.no_grad():
        logits = model.logits(model_hidden(model, tokens[:-1], window))
    prefixes = model.prefix_table[tokens[1:]]
    assert 0 < (prefixes >= 0).sum() < T
    want = (F.cross_entropy(logits, tokens[1:], reduction="sum")
            + 0.25 * F.cross_entropy(logits, prefixes, ignore_index=-1, reduction="sum")) / T
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_a_run_with_both_targets_trains_and_logs_four_weights(tmp_path):
    markov_shards(tmp_path / "data")
    cfg = tiny_config(multi_token_prediction=True, prefix_token_loss=True, vocab_file=str(toy_vocab_file(tmp_path)),
                      steps=6, val_every=6, val_tokens=1024)
    trainer = Trainer(cfg, str(tmp_path / "data"), str(tmp_path / "a"))
    assert trainer.model.prefix_table[258].item() == ord(" ")
    assert trainer.run() == 0
    rows = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if "train_loss" in r}
    assert [train[s]["loss_weights"] for s in (1, 3, 5)] == \
        [[1.0, 0.5, 0.25, 0.25], [1.0, 0.5, 0.0, 0.25], [1.0, 0.0, 0.0, 0.0]]
    assert all(0 < r["train_loss"] < 30 for r in train.values())
