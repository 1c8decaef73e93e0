"""GPU path: compiled FlexAttention and the FP8 head against references. Skipped without CUDA."""
import pytest

torch = pytest.importorskip("torch")

from trainer.attention import dense_attention, document_ids, flex_block_mask  # noqa: E402
from trainer.data import BOS  # noqa: E402
from trainer.fixtures import randomised_model, tiny_config  # noqa: E402
from test_trainer_fp8 import fp8_forward_linear_matches_reference, fp8_linear_matches_reference  # noqa: E402
from trainer.model import GPT  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                            reason="FP8 matmuls need Hopper")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def packed(T, n_docs, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, BOS, (T,), generator=g)
    t[torch.randperm(T, generator=g)[:n_docs]] = BOS
    t[0] = BOS
    return t.cuda()


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("window_blocks", [1, 5, 14])
def test_compiled_flex_attention_matches_dense_reference(window_blocks, exact):
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    T, H, D, bs = 4096, 6, 128, 128
    docs = document_ids(packed(T, 7, window_blocks))
    torch.manual_seed(window_blocks)
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = flex_block_mask(docs, torch.tensor(window_blocks, device="cuda"), bs, exact)
    out = flex(q, k, v, block_mask=mask, scale=0.12)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dense_attention(*ref_in, docs, window_blocks, bs, 0.12, exact)
    assert rel(out, ref) < 1e-2
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.double())
    for a, b in zip((q, k, v), ref_in):
        assert rel(a.grad, b.grad) < 2e-2


def test_compiled_model_with_flex_matches_dense_model():
    cfg = tiny_config(model_dim=256, num_heads=2, head_dim=128, seq_len=2048, num_layers=4, num_value_embeds=2)
    model = randomised_model(cfg, std=0.02, device="cuda")
    model.act_dtype = torch.bfloat16
    t = packed(cfg.seq_len + 1, 5, 0)
    w = torch.tensor(4, device="cuda")
    weights = torch.tensor([1.0, 0.5, 0.25], device="cuda")   # multi-token prediction's first weights
    dense = [model(t[:-1], t[1:], w), model(t[:-1], t[1:], w, target_weights=weights)]
    model.attention = "flex"
    compiled = torch.compile(model, dynamic=False)
    flex = [compiled(t[:-1], t[1:], w), compiled(t[:-1], t[1:], w, target_weights=weights)]
    for f, d in zip(flex, dense):
        assert abs(f.item() - d.item()) < 2e-2 * d.item()
    assert dense[1].item() > 1.5 * dense[0].item()   # the later tokens' losses add to the next token's
    model.fused_head_loss = True      # the fused head + soft-capped loss op, compiled with the rest
    fused = torch.compile(model, dynamic=False)(t[:-1], t[1:], w)
    assert abs(fused.item() - dense.item()) < 2e-2 * dense.item()


@hopper
def test_fp8_linear_close_to_bf16():
    fp8_linear_matches_reference("cuda", M=4096, K=768, N=50304)


@hopper
def test_fp8_forward_linear_at_the_qkv_shape():
    fp8_forward_linear_matches_reference("cuda", M=8192, K=768, N=2304)


@pytest.mark.parametrize("part", ["head", "fused head", "mlp forward", "mlp grad_h", "mlp all", "qkv"])
@hopper
def test_fp8_training_curve_tracks_bf16(part):
    """Same init, same batches: with one part in FP8 (the plain torch head, the fused head + loss op, the
    MLP's forward, plus its grad_h matmul, plus its grad_x matmul, the q, k, v projection), the training curve stays within a few % of bf16's."""
    cfg = tiny_config(model_dim=256, num_heads=2, head_dim=128, seq_len=1024, adam_head_lr=0.02, adam_embed_lr=0.6)
    from trainer.optim import build_optimizers

    g = torch.Generator().manual_seed(0)
    table = torch.randint(0, BOS, (64, 4), generator=g)          # a small random Markov chain to learn
    seqs = []
    for _ in range(30):
        s = [BOS]
        for _ in range(cfg.seq_len):
            s.append(int(table[s[-1] % 64, torch.randint(0, 4, (1,), generator=g)]) if s[-1] != BOS
                     else int(table[torch.randint(0, 64, (1,), generator=g), 0]))
        seqs.append(torch.tensor(s, device="cuda"))
    curves = {}
    for fp8 in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg).cuda()
        model.act_dtype, model.fused_head_loss = torch.bfloat16, part == "fused head"
        model.fp8_head = fp8 and part.endswith("head")
        for block in model.blocks:
            block.mlp.fp8 = part.split()[1] if fp8 and part.startswith("mlp") else "none"
            block.attn.fp8 = fp8 and part == "qkv"
        adam, muon = build_optimizers(model, cfg)
        losses = []
        for s in seqs:
            loss = model(s[:-1], s[1:], torch.tensor(4, device="cuda"))
            loss.backward()
            adam.step(), muon.step(), model.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[fp8] = losses
    assert curves[True][-1] < 0.5 * curves[True][0]                 # it learns
    gaps = [abs(a - b) / b for a, b in zip(curves[True], curves[False])]
    assert sum(gaps) / len(gaps) < 0.03 and max(gaps) < 0.08, gaps
    assert abs(curves[True][-1] - curves[False][-1]) < 0.05 * curves[False][-1]


def test_training_loop_on_the_gpu_logs_every_step_from_cuda_events(tmp_path):
    """The loop reads each step's loss once the next step is queued (CUDA events, a pinned copy): every step
    still gets its line, in order, with its own loss and a train_time that grows."""
    import json

    from orchestrator.data.synthetic import markov_shards
    from trainer.train import Trainer

    markov_shards(tmp_path / "data")
    cfg = tiny_config(model_dim=128, num_heads=2, head_dim=64, steps=6, val_every=3, device="cuda")
    assert Trainer(cfg, str(tmp_path / "data"), str(tmp_path / "out")).run() == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(0 < r["train_loss"] < 12 for r in train) and train[-1]["train_loss"] < train[0]["train_loss"]
    times = [r["train_time_ms"] for r in train]
    assert times == sorted(times) and times[0] > 0
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 6]


@hopper
def test_validation_loss_has_no_fp8_in_it():
    """In eval mode every FP8 path (head, fused head + loss, MLP, q/k/v) is off: the loss equals, bit for bit,
    the same model's with every FP8 switch off; in training mode it differs (the FP8 paths do run)."""
    cfg = tiny_config(model_dim=256, num_heads=2, head_dim=128, seq_len=2048, num_layers=4, num_value_embeds=2,
                      attn_skip_layers="2")
    model = randomised_model(cfg, std=0.02, device="cuda")
    model.act_dtype, model.attention, model.fused_head_loss = torch.bfloat16, "flex", True
    t = packed(cfg.seq_len + 1, 5, 0)
    w = torch.tensor(4, device="cuda")

    def loss(fp8: bool, training: bool) -> float:
        model.fp8_head = fp8
        for block in model.blocks:
            block.mlp.fp8 = "all" if fp8 else "none"
            if block.attn is not None:
                block.attn.fp8 = fp8
        model.train(training)
        with torch.no_grad():
            return model(t[:-1], t[1:], w).item()

    assert loss(True, training=False) == loss(False, training=False)
    assert loss(True, training=True) != loss(False, training=True)


LATER_RECORDS_PARTS = dict(smear=True, bigram_embed=True, bigram_rows=50304 * 2, bigram_dim=128, bigram_sign_rows=512,
                           value_embed_gate=True, skip_gate=True, logit_rescale=True, key_offset=True,
                           multi_token_prediction=True, paired_head_layers="1", mudd=True, xsa=True,
                           attn_vo_init=0.05, attn_input_layer=2)


@pytest.mark.parametrize("parts", [LATER_RECORDS_PARTS, {**LATER_RECORDS_PARTS, "mudd": False, "backout_layer": 1},
                                   {**LATER_RECORDS_PARTS, "dc_layer": 3, "dc_gate_layer": 1}],
                         ids=["mudd", "backout", "dc"])
def test_compiled_model_with_the_later_records_parts_matches_the_dense_model(parts):
    """Smear, the bigram embedding, the value and skip gates, the partial key offset, the paired heads (the attn_prep
    kernel over 2T positions), MUDD's connections (its value term through the attn_prep kernel), XSA, the mimetic V-O
    init, the saved attention input and the logit rescale
    (the fused loss kernel's rescaled form), compiled with FlexAttention in bf16, give the loss of the same model run
    eagerly with dense attention; once more with record-40's backout in MUDD's place (the two exclude each other),
    and with record-85's composable attention in the last layer."""
    cfg = tiny_config(model_dim=256, num_heads=2, head_dim=128, seq_len=2048, num_layers=4, num_value_embeds=2,
                      **parts)
    model = randomised_model(cfg, std=0.02, device="cuda")
    model.act_dtype = torch.bfloat16
    t = packed(cfg.seq_len + 1, 5, 1)
    w = torch.tensor(4, device="cuda")
    weights = torch.tensor([1.0, 0.5, 0.25], device="cuda")   # multi-token prediction's first weights
    dense = [model(t[:-1], t[1:], w), model(t[:-1], t[1:], w, target_weights=weights)]
    model.attention = "flex"
    compiled = torch.compile(model, dynamic=False)
    flex = [compiled(t[:-1], t[1:], w), compiled(t[:-1], t[1:], w, target_weights=weights)]
    for f, d in zip(flex, dense):
        assert abs(f.item() - d.item()) < 2e-2 * d.item()
    assert dense[1].item() > 1.5 * dense[0].item()   # the later tokens' losses add to the next token's


def test_training_loop_on_the_gpu_with_every_later_records_switch(tmp_path):
    """Every issue-22 switch at once (model parts with MUDD, NorMuon with per-head-pair q/k blocks, cautious decay,
    the momentum cool-down, Adam every other step with record-89's betas and table decay, composable attention,
    learned residual scales, multi-token prediction, the prefix target, the document-length cap, the window
    schedule with YaRN and the last validation's longer window) compiles and trains on the GPU: finite losses that
    fall, every step logged."""
    import base64
    import json

    from orchestrator.data.synthetic import markov_shards
    from trainer.train import Trainer

    markov_shards(tmp_path / "data")
    vocab = tmp_path / "toy.tiktoken"   # the prefix target's vocabulary: bytes, then "th", "the", " the"
    vocab.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n"
                             for rank, t in enumerate([bytes([b]) for b in range(256)] + [b"th", b"the", b" the"])))
    cfg = tiny_config(model_dim=128, num_heads=2, head_dim=64, num_layers=4, steps=12, val_every=6, device="cuda",
                      compile=True, muon_variant="normuon", muon_cautious_wd=1.2, muon_momentum_cooldown_steps=4,
                      adam_every_other_step=True, prefix_token_loss=True, vocab_file=str(vocab),
                      doc_len_schedule="1/2:200,1:512", window_schedule="1/2:1,1:2", yarn=True,
                      final_val_window_blocks=4, lr_floor=0.15, muon_qk_pairs=True, adam_group_betas=True,
                      adam_cautious_wd=0.005, dc_layer=3, dc_gate_layer=2, residual_scales=True,
                      inject_after_attention=True,
                      **LATER_RECORDS_PARTS)
    assert Trainer(cfg, str(tmp_path / "data"), str(tmp_path / "out")).run() == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r["train_loss"] for r in records if "train_loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    # the logged train loss is the weighted sum over the targets: multi-token prediction's 1 + 0.5 + 0.25 and the
    # prefix target's 0.25 at the start, 2.0 times a next-token loss of at most ~ln(vocab) = 10.8
    assert len(train) == 12 and all(0 < x < 2.0 * 12 for x in train) and train[-1] < train[0] / 2
    assert val[-1] < val[0]


@pytest.mark.parametrize("schedule, logged", [
    (dict(batch_schedule="1/3:1,2/3:2,1:4"), [(1, 512)] * 3 + [(2, 512)] * 3 + [(4, 512)] * 3),
    (dict(seq_len_schedule="1/3:128,2/3:256,1:512"), [(4, 128)] * 3 + [(4, 256)] * 3 + [(4, 512)] * 3),
])
def test_training_loop_on_the_gpu_with_a_batch_schedule_compiles_no_shape_after_the_warm_up(tmp_path, schedule,
                                                                                          logged):
    """record-46's schedules: phases of 1, 2 and 4 micro-batches of the one compiled shape, or 4 micro-batches of
    three lengths. After the warm-up (training steps and validation, compiled) the loop recompiles nothing, every
    phase trains and is logged."""
    import contextlib
    import json

    from orchestrator.data.synthetic import markov_shards
    from trainer.train import Trainer

    markov_shards(tmp_path / "data")
    cfg = tiny_config(model_dim=128, num_heads=2, head_dim=64, steps=9, val_every=9, device="cuda", compile=True,
                      warmup_compile_steps=2, grad_accum_total=4, **schedule)
    trainer = Trainer(cfg, str(tmp_path / "data"), str(tmp_path / "out"))
    warm_up = trainer.warm_up
    with contextlib.ExitStack() as after_warm_up:
        def warm_up_then_forbid_recompiles():
            warm_up()
            after_warm_up.enter_context(torch._dynamo.config.patch(error_on_recompile=True))

        trainer.warm_up = warm_up_then_forbid_recompiles
        assert trainer.run() == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train_loss" in r]
    assert [(r["micro_batches"], r["micro_batch_len"]) for r in train] == logged
    assert all(0 < r["train_loss"] < 12 for r in train)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[-1] < val[0]


def test_compiled_tied_model_with_the_fused_head_matches_the_dense_model():
    """The head tied to the embedding (records 51/53), compiled with FlexAttention and the fused head + loss op, gives
    the eager dense loss, and the tied table's gradient (both uses summed) is finite and non-zero in both halves."""
    cfg = tiny_config(model_dim=256, num_heads=2, head_dim=128, seq_len=2048, num_layers=4, num_value_embeds=2,
                      tie_head_until=0.5)
    model = randomised_model(cfg, std=0.02, device="cuda")
    model.act_dtype = torch.bfloat16
    t = packed(cfg.seq_len + 1, 5, 2)
    w = torch.tensor(4, device="cuda")
    dense = model(t[:-1], t[1:], w)
    model.attention, model.fused_head_loss = "flex", True
    model.fp8_head = torch.cuda.get_device_capability() >= (9, 0)
    fused = torch.compile(model, dynamic=False)(t[:-1], t[1:], w)
    assert abs(fused.item() - dense.item()) < 2e-2 * dense.item()
    fused.backward()
    g = model.lm_head.weight.grad
    assert torch.isfinite(g).all() and g[t[:-1]].abs().sum() > 0 and model.embed.weight.grad is None


def test_training_loop_on_the_gpu_unties_the_head_and_resumes_after(tmp_path):
    """Compiled with the warm-up (which compiles the untied graph too), the loop trains tied, unties at step 6 of 12
    and trains on; a run resumed from a checkpoint after the untie is untied and finishes."""
    import json

    from orchestrator.data.synthetic import markov_shards
    from trainer.train import Trainer

    markov_shards(tmp_path / "data")
    cfg = tiny_config(model_dim=128, num_heads=2, head_dim=64, num_layers=4, steps=12, val_every=6, device="cuda",
                      compile=True, warmup_compile_steps=3, checkpoint_every=4, tie_head_until=0.5,
                      **LATER_RECORDS_PARTS)
    trainer = Trainer(cfg, str(tmp_path / "data"), str(tmp_path / "out"))
    assert trainer.run() == 0 and not trainer.model.head_tied
    model = trainer.model
    assert not torch.equal(model.embed.weight, model.lm_head.weight[:cfg.vocab_size])
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r["train_loss"] for r in records if "train_loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(train) == 12 and all(0 < x < 12 for x in train) and val[-1] < val[0]
    (tmp_path / "b" / "ckpt").mkdir(parents=True)
    (tmp_path / "out" / "ckpt" / "step_000008.pt").rename(tmp_path / "b" / "ckpt" / "step_000008.pt")
    resumed = Trainer(cfg, str(tmp_path / "data"), str(tmp_path / "b"))
    assert resumed.run(resume="auto") == 0 and not resumed.model.head_tied
    again = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again if "train_loss" in r] == [9, 10, 11, 12]
