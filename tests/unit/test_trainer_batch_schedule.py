"""record-46's batch-size schedule (issue 22), in both forms: micro-batches per step (batch_schedule) and, as the
record runs on 8 GPUs, one micro-batch a rank whose length grows (seq_len_schedule). The schedule and the lr tied to
it are the record's, a step of k micro-batches steps on the mean gradient over their tokens, the warm-up compiles
every length, and the loader hands each step exactly its tokens, across a phase change and across a resume."""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from orchestrator.data.synthetic import markov_shards  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.data import BOS, TrainBatches, find_shards  # noqa: E402
from trainer.fixtures import tiny_config  # noqa: E402
from trainer.schedules import (lr_scale, micro_batch_len, microbatches, step_tokens, warmup_steps,  # noqa: E402
                               window_blocks)
from trainer.train import Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# record-46 in our terms: its 131,072 / 262,144 / 393,216 tokens per step are 8 / 16 / 24 micro-batches of 16,384
# (its lrs by batch_lr_exponent, not the default stage lrs of record-89)
RECORD = dict(seq_len=16384, grad_accum_total=24, batch_schedule="1/3:8,2/3:16,1:24", steps=2120, cooldown_frac=0.55,
              seq_len_schedule="", batch_lr_scales="")
PLAIN = dict(seq_len_schedule="", batch_lr_scales="")   # the defaults without their sequence-length schedule (and its
                                                         # stage lrs): every step full length


def record_batch_tokens(step: int, steps: int = 2120) -> int:
    """record-46's get_bs over its 2120 scheduled steps: a third of training at each batch."""
    return (8, 16, 24)[int(3 * (step / steps))] * 2048 * 8


def record_lr(step: int, steps: int = 2120, cooldown_frac: float = 0.55) -> float:
    """record-46's get_lr (its units: the first phase's lr), with the multiplier (bs / 131,072) ** 0.6 taken at the
    step's own batch (the record rounds it to 1.51 and 1.93 and switches it at x > 0.33 and 0.66)."""
    x = step / steps
    peak = (record_batch_tokens(step, steps) / 131072) ** 0.6
    if x < 1 - cooldown_frac:
        return peak
    w = (1 - x) / cooldown_frac
    return peak * w + (1 - w) * 0.1


def test_microbatches_are_record_46s_thirds():
    cfg = TrainConfig(**RECORD).validate()
    assert [microbatches(cfg, s) * cfg.seq_len for s in range(cfg.steps)] == \
        [record_batch_tokens(s) for s in range(cfg.steps)]
    assert [microbatches(cfg, s) for s in (0, 706, 707, 1413, 1414, 2119, 2120)] == [8, 8, 16, 16, 24, 24, 24]
    short = tiny_config(steps=10, grad_accum_total=4, batch_schedule="1/2:1,4/5:2,1:4")
    assert [microbatches(short, s) for s in range(10)] == [1] * 5 + [2] * 3 + [4] * 2
    off = TrainConfig(**PLAIN)
    assert {microbatches(off, s) for s in range(off.steps + 1)} == {8}


def test_lr_is_tied_to_the_batch_as_record_46_ties_it():
    cfg = TrainConfig(**RECORD).validate()
    # ours is the record's divided by its last phase's multiplier 3 ** 0.6: the lrs stay tuned for the full batch
    for s in range(cfg.steps):
        assert lr_scale(cfg, s) * 3 ** 0.6 == pytest.approx(record_lr(s), rel=1e-12), s
    assert lr_scale(cfg, 0) == pytest.approx(1 / 1.933, rel=1e-3)
    assert lr_scale(cfg, 800) == pytest.approx(1.516 / 1.933, rel=1e-3)   # phase 2, before the cool-down
    assert lr_scale(cfg, cfg.steps) == pytest.approx(0.1 / 1.933, rel=1e-3)
    flat = TrainConfig(**{**RECORD, "batch_lr_exponent": 0.0}).validate()
    off = TrainConfig(**PLAIN, cooldown_frac=0.55, steps=2120)
    assert [lr_scale(flat, s) for s in range(2121)] == [lr_scale(off, s) for s in range(2121)]


def test_batch_lr_scales_give_each_phase_record_89s_multiplier_over_the_last():
    """record-89's stages run x1.0 / x1.52 / x1.73 of its first stage's lr: ours the same ratios, the full batch at
    the configured lrs, the cool-down from the phase's lr to lr_floor x the first phase's as with the exponent."""
    cfg = TrainConfig(steps=300, cooldown_frac=0.2).validate()   # the default's
    first, second, last = 1 / 1.73, 1.52 / 1.73, 1.0
    assert [lr_scale(cfg, s) for s in (0, 99, 100, 199, 200, 239)] == \
        pytest.approx([first, first, second, second, last, last], rel=1e-12)
    assert lr_scale(cfg, 270) == pytest.approx(0.5 * last + 0.5 * 0.1 * first, rel=1e-12)
    assert lr_scale(cfg, 300) == pytest.approx(0.1 * first, rel=1e-12)
    by_count = TrainConfig(**{**RECORD, "batch_lr_scales": "2,3,4"}).validate()   # the batch_schedule's phases alike
    assert [lr_scale(by_count, s) for s in (0, 800)] == pytest.approx([0.5, 0.75], rel=1e-12)


@pytest.mark.parametrize("scales, words", [
    ("1,2", "must be 3 positive numbers"), ("1,x,2", "must be 3 positive numbers"),
    ("1,0,2", "must be 3 positive numbers"),
])
def test_bad_batch_lr_scales_are_refused_naming_the_key(scales, words):
    with pytest.raises(ValueError, match=f"^batch_lr_scales: {words}"):
        TrainConfig(batch_lr_scales=scales).validate()
    with pytest.raises(ValueError, match="^batch_lr_scales: needs a batch_schedule or seq_len_schedule"):
        TrainConfig(**{**PLAIN, "batch_lr_scales": "1"}).validate()


def test_without_a_schedule_the_lr_is_the_plain_cool_down_bit_for_bit():
    for cfg in (TrainConfig(**PLAIN), TrainConfig(**PLAIN, warmup_steps=50)):
        for s in range(cfg.steps + 1):
            if s < cfg.warmup_steps:
                want = (s + 1) / cfg.warmup_steps
            elif s / cfg.steps < 1 - cfg.cooldown_frac:
                want = 1.0
            else:
                w = (1 - s / cfg.steps) / cfg.cooldown_frac
                want = w + (1 - w) * 0.1
            assert lr_scale(cfg, s) == want


@pytest.mark.parametrize("schedule, words", [
    ("1/3:8,2/3:16", "needs END within"),             # 16 > grad_accum_total=8
    ("1/2:4", "last phase must end at 1"),
    ("1/2:4,1/3:8,1:8", "ENDs must increase"),
    ("0:4,1:8", "needs END within"),
    ("1/2:0,1:8", "needs END within"),
    ("half:4,1:8", "is not END:COUNT"),
    ("1/2-4,1:8", "is not END:COUNT"),
])
def test_a_bad_schedule_is_refused_naming_the_key(schedule, words):
    with pytest.raises(ValueError, match=f"^batch_schedule: .*{words}"):
        TrainConfig(**PLAIN, batch_schedule=schedule).validate()
    with pytest.raises(ValueError, match="^batch_lr_exponent"):
        TrainConfig(**PLAIN, batch_schedule="1:8", batch_lr_exponent=-1).validate()


def test_a_schedule_that_does_not_split_over_the_ranks_is_refused(tmp_path):
    from trainer.distributed import Ranks

    markov_shards(tmp_path / "data")
    cfg = tiny_config(grad_accum_total=4, batch_schedule="1/2:2,3/4:3,1:4")
    with pytest.raises(ValueError, match="^batch_schedule: a phase of 3 micro-batches does not split over 2 ranks"):
        Trainer(cfg, str(tmp_path / "data"), str(tmp_path / "out"), ranks=Ranks(0, 2, 0, torch.device("cpu")))
    loader = TrainBatches(find_shards(str(tmp_path / "data"), cfg.train_files), 512, 0, 2, 4)
    with pytest.raises(ValueError, match="batch_schedule"):
        loader.next_step(3)


def noisy_trainer(tmp_path, cfg) -> Trainer:
    markov_shards(tmp_path / "data")
    trainer = Trainer(cfg, str(tmp_path / "data"), str(tmp_path / "out"))
    with torch.no_grad():   # the zero-initialised head and projections would leave most gradients at zero
        for p in trainer.model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0, 0.05)
    return trainer


def test_a_step_of_k_micro_batches_steps_on_the_mean_gradient_over_their_tokens(tmp_path):
    from trainer.model import GPT

    cfg = tiny_config(grad_accum_total=4, batch_schedule="1/2:2,1:4", steps=4)
    trainer = noisy_trainer(tmp_path, cfg)
    batch = trainer.batches.next_step(microbatches(cfg, 0))
    assert len(batch) == 2
    reference = GPT(cfg)   # the plain mean: every token of both micro-batches, one sum, one division
    reference.load_state_dict(trainer.model.state_dict())
    window = torch.tensor(window_blocks(cfg, 0))
    seqs = [torch.from_numpy(s.astype("int64")) for s in batch]
    total = sum(reference(s[:-1], s[1:], window, reduction="sum") for s in seqs)
    mean = total / (2 * cfg.seq_len)
    mean.backward()
    seen = {}
    muon_step = trainer.muon.step

    def record_then_step():
        seen.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        seen["lr"] = trainer.muon.param_groups[0]["lr"]
        muon_step()

    trainer.muon.step = record_then_step
    loss = trainer.train_step(batch, 0)
    assert loss.item() == pytest.approx(mean.item(), rel=1e-6)
    grads = dict(reference.named_parameters())
    assert set(seen) - {"lr"} == {n for n, p in grads.items() if p.grad is not None}
    for name, p in grads.items():
        if p.grad is not None:
            torch.testing.assert_close(seen[name], p.grad, rtol=1e-5, atol=1e-8, msg=name)
    assert seen["lr"] == pytest.approx(cfg.muon_lr * 0.5 ** 0.6)   # 2 of grad_accum_total=4 micro-batches


def recorded_run(cfg, data, out, resume=None):
    """Run a trainer; returns {step: the micro-batches it trained on} and the metrics' train rows."""
    trainer = Trainer(cfg, str(data), str(out))
    fed = {}
    train_step = trainer.train_step

    def recording(micro_batches, step):
        fed[step] = [np.array(s) for s in micro_batches]
        return train_step(micro_batches, step)

    trainer.train_step = recording
    assert trainer.run(resume=resume) == 0
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return fed, {r["step"]: r for r in rows if "train_loss" in r}


def assert_resumed_run_repeats(cfg, tmp_path, fed, rows):
    """A 6-step run in tmp_path/a resumed from its step-2 checkpoint in tmp_path/b trains steps 2-5 on the same
    tokens to the same losses."""
    (tmp_path / "b" / "ckpt").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "ckpt" / "step_000002.pt", tmp_path / "b" / "ckpt" / "step_000002.pt")
    resumed, resumed_rows = recorded_run(cfg, tmp_path / "data", tmp_path / "b", resume="auto")
    assert sorted(resumed) == [2, 3, 4, 5]
    for s in resumed:
        assert all(np.array_equal(a, b) for a, b in zip(resumed[s], fed[s], strict=True)), s
        assert resumed_rows[s + 1]["train_loss"] == pytest.approx(rows[s + 1]["train_loss"], rel=1e-6)


def test_the_loader_feeds_each_step_its_tokens_across_a_phase_change_and_a_resume(tmp_path):
    markov_shards(tmp_path / "data")
    cfg = tiny_config(batch_schedule="1/2:1,1:2", steps=6, val_every=6, val_tokens=1024, checkpoint_every=2)
    fed, rows = recorded_run(cfg, tmp_path / "data", tmp_path / "a")
    assert [len(fed[s]) for s in range(6)] == [1, 1, 1, 2, 2, 2]
    assert [rows[s]["micro_batches"] for s in range(1, 7)] == [1, 1, 1, 2, 2, 2]
    # the steps together took the stream's first 9 sequences, in order, none skipped and none twice
    plain = TrainBatches(find_shards(str(tmp_path / "data"), cfg.train_files), cfg.seq_len, 0, 1, 1)
    stream = [plain.next_step()[0] for _ in range(9)]
    assert all(np.array_equal(a, b) for a, b in zip([s for k in range(6) for s in fed[k]], stream, strict=True))
    # resumed from step 2 (phase 1), it crosses the change at step 3 on the same tokens and the same losses
    assert_resumed_run_repeats(cfg, tmp_path, fed, rows)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_every_phase_of_the_same_global_stream(tmp_path, world):
    markov_shards(tmp_path / "data")
    files = find_shards(str(tmp_path / "data"), "fineweb_train_*.bin")
    counts = [4, 4, 8, 8]
    ranks = [TrainBatches(files, 512, r, world, 8) for r in range(world)]
    one = TrainBatches(files, 512, 0, 1, 8)
    for count in counts:
        mine = [loader.next_step(count) for loader in ranks]
        assert {len(m) for m in mine} == {count // world}
        want = one.next_step(count)
        assert all(np.array_equal(mine[k % world][k // world], want[k]) for k in range(count))
        assert all(loader.state_dict() == one.state_dict() for loader in ranks)   # each rank resumes where all do


# record-46 as it runs on 8 GPUs: grad_accum_steps 1, batch_size // 8 tokens a rank
RECORD_8GPU = dict(seq_len=49152, grad_accum_total=8, seq_len_schedule="1/3:16384,2/3:32768,1:49152", steps=2120,
                   cooldown_frac=0.55, batch_lr_scales="")


def test_each_step_has_record_46s_tokens_in_eight_micro_batches():
    cfg = TrainConfig(**RECORD_8GPU).validate()
    assert [step_tokens(cfg, s) for s in range(cfg.steps)] == [record_batch_tokens(s) for s in range(cfg.steps)]
    assert {microbatches(cfg, s) for s in range(cfg.steps + 1)} == {8}
    assert [micro_batch_len(cfg, s) for s in (0, 706, 707, 1413, 1414, 2119, 2120)] == \
        [16384, 16384, 32768, 32768, 49152, 49152, 49152]
    off = TrainConfig(**PLAIN)
    assert {micro_batch_len(off, s) for s in range(off.steps + 1)} == {off.seq_len}


def test_the_lr_follows_the_tokens_exactly_as_the_micro_batch_count_form():
    cfg = TrainConfig(**RECORD_8GPU).validate()
    counted = TrainConfig(**RECORD).validate()   # the same tokens per step as 8 / 16 / 24 micro-batches of 16,384
    for s in range(cfg.steps + 1):
        assert lr_scale(cfg, s) == lr_scale(counted, s), s
    # the record's multipliers, ours divided by its last phase's 3 ** 0.6: the lrs stay tuned for the full batch
    assert all(lr_scale(cfg, s) * 3 ** 0.6 == pytest.approx(record_lr(s), rel=1e-12) for s in range(cfg.steps))


@pytest.mark.parametrize("overrides, words", [
    (dict(seq_len_schedule="1/2:1000,1:2048", seq_len=2048), "seq_len_schedule: '1/2:1000' needs END .* multiple of 128"),
    (dict(seq_len_schedule="1/2:4096,1:2048", seq_len=2048), "seq_len_schedule: '1/2:4096' needs END .* 128..2048"),
    (dict(seq_len_schedule="1/2:1024", seq_len=2048), "seq_len_schedule: the last phase must end at 1"),
    (dict(seq_len=16384), "seq_len_schedule: '2/3:32768' needs END .* 128..16384 .*; or '' for off"),   # the default
    (dict(seq_len_schedule="1/2-1024,1:2048", seq_len=2048), "seq_len_schedule: '1/2-1024' is not END:TOKENS"),
    (dict(seq_len_schedule="1/2:1024,1:2048", batch_schedule="1/2:4,1:8", seq_len=2048),
     "batch_schedule, seq_len_schedule: set one of them"),
])
def test_a_bad_seq_len_schedule_is_refused_naming_the_key(overrides, words):
    with pytest.raises(ValueError, match=f"^{words}"):
        TrainConfig(**overrides).validate()


def test_the_warm_up_runs_every_micro_batch_length_and_nothing_else_changes_without_a_schedule():
    cfg = TrainConfig(**RECORD_8GPU).validate()
    steps = warmup_steps(cfg, 3, tied=False)
    # 0 and 706 are in the first third and 1413 in the second: the last third's first step is added
    assert steps == [0, 706, 1413, 1414]
    assert {micro_batch_len(cfg, s) for s in steps} == {16384, 32768, 49152}
    plain = TrainConfig(**PLAIN, steps=200)
    assert warmup_steps(plain, 3, tied=False) == [0, 66, 133]
    tied = TrainConfig(**PLAIN, steps=200, tie_head_until=0.6667)
    assert warmup_steps(tied, 3, tied=True) == [0, 66, 134]   # the last one past the untie at ceil(133.34)
    assert warmup_steps(TrainConfig(**RECORD_8GPU, tie_head_until=0.99), 3, tied=True)[:3] == [0, 706, 2099]


@pytest.mark.parametrize("cuda_graphs, per_step", [(False, 1), (True, 2)])
def test_the_warm_up_runs_one_micro_batch_a_step_or_two_for_cuda_graphs(tmp_path, cuda_graphs, per_step):
    """Every micro-batch of a step runs the same graphs: the warm-up runs one of each step's 4 (two with CUDA graphs,
    which record at a graph's second run), at every length of the schedule, then puts the model back."""
    from trainer.cuda_graphs import OwnedGradients

    markov_shards(tmp_path / "data")
    cfg = tiny_config(seq_len_schedule="1/2:256,1:512", grad_accum_total=4, warmup_compile_steps=2, steps=6)
    trainer = Trainer(cfg, str(tmp_path / "data"), str(tmp_path / "out"))
    trainer.compiled = True   # the warm-up runs only for a compiled model; eager here, the same steps
    if cuda_graphs:
        trainer.owned_grads = OwnedGradients(trainer.model.parameters())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    fed = []
    train_step = trainer.train_step
    trainer.train_step = lambda mb, step: fed.append((step, [len(s) for s in mb])) or train_step(mb, step)
    trainer.warm_up()
    assert fed == [(step, [micro_batch_len(cfg, step) + 1] * per_step) for step in warmup_steps(cfg, 2, tied=False)]
    assert {length for _, (length, *_) in fed} == {257, 513}
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_the_loader_cuts_each_micro_batch_at_the_asked_length_from_one_stream(tmp_path):
    markov_shards(tmp_path / "data")
    files = find_shards(str(tmp_path / "data"), "fineweb_train_*.bin")
    one = TrainBatches(files, 512, 0, 1, 2)
    ranks = [TrainBatches(files, 512, r, 2, 2) for r in range(2)]
    for length in (128, 128, 256, 512, 512):
        want = one.next_step(2, length)
        assert [len(s) for s in want] == [length + 1] * 2 and all(s[0] == BOS for s in want)
        mine = [loader.next_step(2, length) for loader in ranks]
        assert all(np.array_equal(mine[k][0], want[k]) for k in range(2))
        assert all(loader.state_dict() == one.state_dict() for loader in ranks)
    with pytest.raises(ValueError, match="^seq_len_schedule: a micro-batch of 1024 tokens"):
        one.next_step(2, 1024)


def test_a_run_grows_its_micro_batches_across_a_phase_change_and_a_resume(tmp_path):
    markov_shards(tmp_path / "data")
    cfg = tiny_config(seq_len_schedule="1/2:256,1:512", steps=6, val_every=6, val_tokens=1024, checkpoint_every=2)
    fed, rows = recorded_run(cfg, tmp_path / "data", tmp_path / "a")
    assert [[len(m) for m in fed[s]] for s in range(6)] == [[257] * 2] * 3 + [[513] * 2] * 3
    assert [(rows[s]["micro_batches"], rows[s]["micro_batch_len"]) for s in range(1, 7)] == \
        [(2, 256)] * 3 + [(2, 512)] * 3
    assert rows[1]["lr_scale"] == pytest.approx(lr_scale(tiny_config(steps=6), 0) * 0.5 ** 0.6)   # half the tokens
    # resumed from step 2 (first phase), it crosses the change at step 3 on the same tokens and the same losses
    assert_resumed_run_repeats(cfg, tmp_path, fed, rows)


# ------------------------------------------------------------------------------ the document-length cap

def docs_shard(path, lengths, first_token=1):
    """One train shard of documents of these lengths (BOS included), document i's tokens i*100+1, i*100+2, ..."""
    from trainer.data import write_shard

    docs = [np.concatenate([[BOS], 100 * i + np.arange(first_token, first_token + n - 1)]) for i, n in enumerate(lengths)]
    path.mkdir(parents=True, exist_ok=True)
    write_shard(path / "fineweb_train_000001.bin", np.concatenate(docs).astype(np.uint16))
    return docs


def test_a_capped_micro_batch_is_documents_first_tokens_back_to_back(tmp_path):
    docs = docs_shard(tmp_path / "d", [10, 3, 20, 5, 9, 40, 2, 7] * 6)
    files = find_shards(str(tmp_path / "d"), "fineweb_train_*.bin")
    loader = TrainBatches(files, 64, 0, 1, 1)
    first = loader.next_step(1, 15, cap=6)[0]
    # 16 tokens: doc 0's first 6, doc 1 whole (3), doc 2's first 6, then doc 3's BOS fills the micro-batch
    assert first.tolist() == [*docs[0][:6], *docs[1], *docs[2][:6], docs[3][0]]
    second = loader.next_step(1, 15, cap=6)[0]   # the rest of doc 3 is skipped: doc 4 starts the next one
    assert second.tolist() == [*docs[4][:6], *docs[5][:6], *docs[6], *docs[7][:2]]
    # ranks split the same global stream; a cap past every document is the stream of whole documents
    ranks = [TrainBatches(files, 64, r, 2, 2) for r in range(2)]
    one = TrainBatches(files, 64, 0, 1, 2)
    for _ in range(4):
        want = one.next_step(2, 15, cap=6)
        assert all(np.array_equal(ranks[k].next_step(2, 15, cap=6)[0], want[k]) for k in range(2))
    whole = TrainBatches(files, 64, 0, 1, 1).next_step(1, 30, cap=1000)[0]
    assert whole.tolist() == [*docs[0], *docs[1], *docs[2][:18]]   # 31 tokens: 10 + 3 + 18


def test_the_cap_follows_its_schedule_and_a_bad_one_names_the_key():
    from trainer.schedules import doc_len_cap

    cfg = TrainConfig(**PLAIN, seq_len=2048, grad_accum_total=8, steps=300, doc_len_schedule="1/3:896,1:2048").validate()
    assert [doc_len_cap(cfg, s) for s in (0, 99, 100, 299, 300)] == [896, 896, 0, 0, 0]   # 2048: no cut at 2048
    record = TrainConfig(**RECORD_8GPU, doc_len_schedule="1/3:896,1:2048").validate()   # the current record's stages
    assert [doc_len_cap(record, s) for s in (0, 706, 707, 2119)] == [896, 896, 2048, 2048]
    assert doc_len_cap(TrainConfig(**PLAIN), 0) == 0
    with pytest.raises(ValueError, match="^doc_len_schedule: '1/3:1' needs END within"):
        TrainConfig(**PLAIN, doc_len_schedule="1/3:1,1:2048").validate()


def test_a_run_with_a_capped_first_half_trains_on_those_tokens(tmp_path):
    markov_shards(tmp_path / "data")
    cfg = tiny_config(doc_len_schedule="1/2:200,1:512", steps=4, val_every=4, val_tokens=1024)
    fed, rows = recorded_run(cfg, tmp_path / "data", tmp_path / "a")
    assert [rows[s]["doc_len_cap"] for s in range(1, 5)] == [200, 200, 0, 0]
    for s in (0, 1):   # no document runs past 200 tokens in the first half: BOS at most 200 tokens apart
        for seq in fed[s]:
            starts = np.flatnonzero(seq == BOS)
            assert starts[0] == 0 and np.diff(np.append(starts, len(seq))).max() <= 200
    later = [np.diff(np.append(np.flatnonzero(seq == BOS), len(seq))).max() for s in (2, 3) for seq in fed[s]]
    assert max(later) > 200   # whole documents again (the Markov shards' longest run past 200 tokens)


def test_the_cool_down_ends_at_lr_floor_and_the_default_is_record28s():
    base = tiny_config(steps=100, cooldown_frac=0.6)
    raised = tiny_config(steps=100, cooldown_frac=0.6, lr_floor=0.15)
    assert [lr_scale(base, s) for s in range(40)] == [lr_scale(raised, s) for s in range(40)] == [1.0] * 40
    assert lr_scale(base, 100) == pytest.approx(0.1) and lr_scale(raised, 100) == pytest.approx(0.15)
    assert lr_scale(raised, 70) == pytest.approx(0.5 * 1.0 + 0.5 * 0.15)   # halfway down the cool-down
    with pytest.raises(ValueError, match="^lr_floor: must be within"):
        tiny_config(lr_floor=1.5)
