"""Techniques of records after record-28, each behind its own TrainConfig switch (issue 22): with every switch off
the trainer computes what it computed before them; each switch, on, computes what its record specifies. The tiny
model of these tests is record-28's (trainer/fixtures.py); the defaults turn on what the yardstick kept."""
import pytest

torch = pytest.importorskip("torch")

from trainer.data import BOS  # noqa: E402
from trainer.fixtures import packed_tokens, randomised_model, tiny_config  # noqa: E402
from trainer.optim import build_optimizers  # noqa: E402

# one forward, backward, Adam and Muon step of the default tiny model (below), computed at 075632d, before any of
# these switches existed: the loss, and sums over the state dict (entry i weighted by i+1) of each entry's mean and
# mean square. Computed, then and in the test, on one thread with the CPU's vector paths pinned (DIGEST_ENV): MKL in
# its reproducible mode, ATen's kernels without AVX, oneDNN off. Left to themselves they round differently by
# instruction set (seen 2026-12-05: an AVX-512 machine's sums were 9e-7 off the AVX2 figures the test then held).
# Pinned, an AMD EPYC machine (2026-12-06) still had the loss bit for bit but the sums 5e-10 off (relative): the
# optimizer's step rounds by CPU even so. The sums are held to 1e-8, far inside what any switch's change moves.
BEFORE_SWITCHES = (10.909619331359863, 64.36770092223935, 52.94555760353695)
DIGEST_ENV = dict(MKL_CBWR="COMPATIBLE", ATEN_CPU_CAPABILITY="default")



def tokens(T=512, starts=(0, 200), seed=3):
    return packed_tokens(T + 1, starts, seed)


def with_switches(**switches):
    """(a randomised default tiny model, the same model with these switches on and their new parts as built)."""
    from trainer.model import GPT

    plain = randomised_model(tiny_config())
    model = GPT(tiny_config(**switches))
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert missing and not unexpected
    return plain, model


def one_step_digest(cfg) -> tuple[float, float, float]:
    """(loss, sum of (i+1) * mean of entry i, sum of (i+1) * mean square of entry i) after one training step."""
    torch.manual_seed(0)
    model = randomised_model(cfg)
    t = tokens()
    loss = model(t[:-1], t[1:], torch.tensor(2))
    loss.backward()
    adam, muon = build_optimizers(model, cfg)
    adam.step()
    muon.step()
    entries = [p.detach().double() for p in model.state_dict().values()]
    return (loss.item(), sum((i + 1) * p.mean().item() for i, p in enumerate(entries)),
            sum((i + 1) * p.square().mean().item() for i, p in enumerate(entries)))


def test_with_every_switch_off_one_step_is_bit_identical_to_before_the_switches():
    """In a child process: the environment pins the vector paths before torch loads."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve()
    child = ("import sys, torch; torch.set_num_threads(1); torch.backends.mkldnn.enabled = False; "
             f"sys.path.insert(0, {str(here.parent)!r}); "
             "from test_trainer_later_records import one_step_digest, tiny_config; "
             "print(repr(one_step_digest(tiny_config(num_layers=4, num_value_embeds=1))))")
    out = subprocess.run([sys.executable, "-c", child], env={**os.environ, **DIGEST_ENV}, cwd=here.parents[2],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loss, means, squares = eval(out.stdout.strip().splitlines()[-1])
    assert loss == BEFORE_SWITCHES[0]   # bit for bit
    assert (means, squares) == pytest.approx(BEFORE_SWITCHES[1:], rel=1e-8, abs=0)


def test_the_defaults_keep_what_the_yardstick_kept():
    from trainer.config import TrainConfig

    d = TrainConfig()
    assert d.bigram_embed and d.muon_variant == "normuon" and d.paired_head_layers == "1,3,6,10"
    assert d.seq_len_schedule == "1/3:16384,2/3:32768,1:49152" and d.cuda_graphs and d.steps == 1998
    assert d.batch_lr_scales == "1,1.52,1.73" and d.phase_lr_scales() == pytest.approx((1 / 1.73, 1.52 / 1.73, 1))
    assert d.attn_vo_init == 0.05 and d.muon_qk_pairs
    assert not (d.smear or d.value_embed_gate or d.skip_gate or d.adam_every_other_step or d.muon_cautious_wd
                or d.muon_momentum_cooldown_steps or d.batch_schedule or d.key_offset or d.multi_token_prediction
                or d.mudd or d.mlp_skip_layers)


def test_the_tiny_model_builds_none_of_the_later_records_parts():
    model = randomised_model(tiny_config())
    assert model.smear is None and model.bigram is None and model.bigram_lambdas is None and model.skip_gate is None
    assert model.mudd is None
    assert all(b.attn.value_gate is None for b in model.blocks)


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


def adam_group_of(adam, param) -> dict:
    return next(g for g in adam.param_groups if any(p is param for p in g["params"]))


def test_smear_gate_is_trained_by_adam_at_a_hundredth_of_the_base_lr_and_its_lambda_with_the_scalars():
    from trainer.optim import build_optimizers, split_parameters

    cfg = tiny_config(smear=True)
    model = randomised_model(cfg)
    parts = split_parameters(model)
    assert not any(p is model.smear.gate for p in parts["hidden"])   # record-52 moved it off Muon
    assert any(p is model.smear.lam for p in parts["scalars"])
    adam, _ = build_optimizers(model, cfg)
    group = adam_group_of(adam, model.smear.gate)
    assert group["lr"] == cfg.adam_smear_gate_lr == 0.008 * 0.01 and group["betas"] == (0.9, 0.99)
    assert [p for p in group["params"]] == [model.smear.gate]


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


# ----------------------------------------------------------------------- value-embedding and skip gates (record-55)


def test_value_gate_scales_each_heads_value_embedding_by_twice_the_sigmoid_of_its_projection():
    from trainer.layers import Attention

    torch.manual_seed(1)
    attn = Attention(64, 2, 32, value_gate_dims=12)
    with torch.no_grad():
        attn.c_proj.weight.normal_(0, 0.1)
        attn.value_gate.weight.normal_()
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.rms_norm(torch.randn(1, 256, 64, generator=g), (64,))
    ve = torch.randn(1, 256, 64, generator=g)
    docs = torch.zeros(256, dtype=torch.long)
    gated = attn(x, ve, docs, 2, 128, None)
    w = attn.value_gate.weight.detach().clone()
    attn.value_gate = None
    with torch.no_grad():
        attn.lambdas[1] = 1.0   # the gate replaces the value embedding's lambda
    # record-70's input: the first 6 dims of the attention's input and the first 6 of the value embedding
    scaled = (2 * torch.sigmoid(torch.cat([x[..., :6], ve[..., :6]], -1) @ w.t()))[..., None] * ve.view(1, 256, 2, 32)
    assert torch.allclose(gated, attn(x, scaled.view(1, 256, 64), docs, 2, 128, None), atol=1e-6)


def test_value_gates_sit_on_the_layers_with_value_embeddings_and_train_by_adam():
    from trainer.optim import build_optimizers, split_parameters

    cfg = tiny_config(num_layers=4, num_value_embeds=1, value_embed_gate=True, skip_gate=True)
    model = randomised_model(cfg)
    assert [b.attn.value_gate is not None for b in model.blocks] == [True, False, False, True]
    t = tokens()
    model(t[:-1], t[1:], torch.tensor(2)).backward()
    hidden = split_parameters(model)["hidden"]
    adam, _ = build_optimizers(model, cfg)
    for i in (0, 3):
        gate = model.blocks[i].attn.value_gate.weight
        assert gate.shape == (2, 12) and gate.grad.abs().sum() > 0 and not any(p is gate for p in hidden)
        group = adam_group_of(adam, gate)   # record-70 on: Adam at the base lr, the current record's betas
        assert group["lr"] == cfg.adam_gate_lr == 0.008 and group["betas"] == (0.9, 0.99)
    skip = adam_group_of(adam, model.skip_gate.weight)
    assert skip["lr"] == cfg.adam_skip_gate_lr and skip["betas"] == (0.9, 0.99)


def test_skip_gate_starts_as_a_no_op_and_scales_the_skip_by_twice_the_sigmoid_of_x0():
    t = tokens()
    plain, model = with_switches(skip_gate=True)
    loss = model(t[:-1], t[1:], torch.tensor(2))
    assert torch.equal(loss, plain(t[:-1], t[1:], torch.tensor(2)))   # 2 * sigmoid(0) = 1 exactly
    loss.backward()
    assert model.skip_gate.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.skip_gate.weight.normal_()
        model.skip_weights.fill_(0.7)
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.update(skip=out))
    model.blocks[1].register_forward_pre_hook(lambda m, args: seen.update(x=args[0], x0=args[1]))
    model(t[:-1], t[1:], torch.tensor(2))
    gate = 2 * torch.sigmoid(seen["x0"][..., :12] @ model.skip_gate.weight.t())
    # two layers: layer 1 gets layer 0's output plus its own skip, gated
    assert torch.allclose(seen["x"], seen["skip"] + 0.7 * gate * seen["skip"], atol=1e-6)


def test_skip_gate_trains_with_adam_at_its_own_rate():
    cfg = tiny_config(skip_gate=True)
    model = randomised_model(cfg)
    adam, muon = build_optimizers(model, cfg)
    groups = [g for g in adam.param_groups if any(p is model.skip_gate.weight for p in g["params"])]
    assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(0.008 * 0.05) and len(groups[0]["params"]) == 1
    assert len(build_optimizers(randomised_model(tiny_config()), tiny_config())[0].param_groups) == 3


# ------------------------------------------------- Muon's momentum cool-down (record-39), cautious decay (record-43)


def test_muon_momentum_cools_down_over_the_last_steps_only_when_asked():
    from trainer.schedules import muon_momentum

    def before(cfg, step):   # the schedule before the cool-down existed
        frac = min(step / cfg.muon_momentum_warmup_steps, 1.0)
        return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum

    off = tiny_config(steps=1000, muon_momentum_warmup_steps=300)
    assert all(muon_momentum(off, s) == before(off, s) for s in range(1001))
    on = tiny_config(steps=1000, muon_momentum_warmup_steps=300, muon_momentum_cooldown_steps=50)
    assert all(muon_momentum(on, s) == before(on, s) for s in range(951))   # the record's 'step > start'
    assert muon_momentum(on, 951) == pytest.approx(0.95 - 0.1 / 50)
    assert muon_momentum(on, 975) == pytest.approx(0.90)
    assert muon_momentum(on, 999) == pytest.approx(0.85 + 0.1 / 50)


def test_cautious_weight_decay_decays_only_where_update_and_weight_agree_in_sign():
    from trainer.optim import cautious_weight_decay

    update = torch.tensor([0.5, -0.5, 0.5, -0.5, 0.0])
    params = torch.tensor([2.0, -2.0, -2.0, 2.0, 3.0])
    got = cautious_weight_decay(update, params, 0.1)
    assert torch.equal(got, torch.tensor([0.7, -0.7, 0.5, -0.5, 0.3]))


def test_muon_with_cautious_decay_steps_by_lr_times_the_update_plus_lr_wd_p_where_signs_agree():
    from trainer.optim import NEWTON_SCHULZ, Muon, orthogonalize

    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(16, 32))
    start = p.detach().clone()
    g = torch.randn(16, 32)
    p.grad = g.clone()
    Muon([p], lr=0.1, momentum=0.9, cautious_wd=1.2).step()
    o = orthogonalize(g.lerp(0.1 * g, 0.9), NEWTON_SCHULZ, margin=1.0).float()
    agree = (o * start >= 0).float()
    assert 0 < agree.mean() < 1
    assert torch.allclose(p.detach(), start - 0.1 * (o + 0.1 * 1.2 * agree * start), atol=1e-6)


def test_the_config_switch_reaches_muon():
    cfg = tiny_config(muon_cautious_wd=1.2)
    _, muon = build_optimizers(randomised_model(cfg), cfg)
    assert muon.param_groups[0]["cautious_wd"] == 1.2


# ----------------------------------------------------------------------------------------- NorMuon (record-41)


def normuon_reference(update, second, beta2):
    """One matrix, one neuron at a time: rows of a tall or square matrix, columns of a wide one."""
    out, new = torch.empty_like(update), second.clone()
    wide = update.size(0) < update.size(1)
    u = update.t() if wide else update
    o, s = (out.t(), new.t()) if wide else (out, new)
    for i in range(u.size(0)):
        s[i] = beta2 * s[i] + (1 - beta2) * (u[i] ** 2).mean()
        o[i] = u[i] / s[i].sqrt()
    return out * update.norm() / out.norm(), new


@pytest.mark.parametrize("shape", [(16, 32), (32, 16), (24, 24)])
def test_normuon_divides_each_neuron_by_its_running_rms_then_restores_the_norm(shape):
    from trainer.optim import normuon

    torch.manual_seed(0)
    rows, cols = shape
    second = torch.zeros((rows, 1) if rows >= cols else (1, cols))
    for _ in range(2):   # the second step uses the first one's running mean
        u = torch.randn(shape) * torch.linspace(0.1, 3, rows)[:, None]
        want, want_second = normuon_reference(u, second, 0.95)
        got, second = normuon(u[None], second[None], 0.95)
        got, second = got[0], second[0]
        assert torch.allclose(second, want_second, rtol=1e-5) and torch.allclose(got, want, rtol=1e-4, atol=1e-6)
        assert torch.allclose(got.norm(), u.norm(), rtol=1e-5)


def test_muon_as_normuon_keeps_each_matrix_second_moment_and_steps_by_the_normalised_update():
    from trainer.optim import NEWTON_SCHULZ, Muon, orthogonalize

    torch.manual_seed(3)
    a, b = torch.nn.Parameter(torch.randn(16, 32)), torch.nn.Parameter(torch.randn(3, 32, 16))
    start_a = a.detach().clone()
    ga, gb = torch.randn(16, 32), torch.randn(3, 32, 16)
    a.grad, b.grad = ga.clone(), gb.clone()
    opt = Muon([a, b], lr=0.1, momentum=0.9, normuon_beta2=0.95)
    opt.step()
    assert opt.state[a]["second_moment"].shape == (1, 32) and opt.state[b]["second_moment"].shape == (3, 32, 1)
    o = orthogonalize(ga.lerp(0.1 * ga, 0.9), NEWTON_SCHULZ, margin=1.0).float()
    want, want_second = normuon_reference(o, torch.zeros(1, 32), 0.95)
    assert torch.allclose(opt.state[a]["second_moment"], want_second, rtol=1e-5)
    assert torch.allclose(a.detach(), start_a - 0.1 * want, atol=1e-6)
    assert "second_moment" in opt.state_dict()["state"][0]   # checkpoints carry it


def test_the_config_picks_normuon():
    cfg = tiny_config(muon_variant="normuon")
    _, muon = build_optimizers(randomised_model(cfg), cfg)
    assert muon.param_groups[0]["normuon_beta2"] == 0.95
    _, plain = build_optimizers(randomised_model(tiny_config()), tiny_config())
    assert plain.param_groups[0]["normuon_beta2"] is None
    with pytest.raises(ValueError, match="muon_variant"):
        tiny_config(muon_variant="adamw")


# ----------------------------------------------------------------------- per-head-pair Q and K in Muon (record-80)


@pytest.mark.parametrize("normuon", [False, True])
def test_muon_takes_q_and_k_a_pair_of_heads_at_a_time_and_v_whole(normuon):
    """A (3, 8, 6) q/k/v parameter with row blocks (2, 4): each 4-row block of q and of k steps as its own matrix
    would, v as one 8-row matrix; the same as five separate parameters of those shapes (NorMuon included)."""
    from trainer.optim import Muon

    torch.manual_seed(5)
    qkv = torch.nn.Parameter(torch.randn(3, 8, 6))
    qkv.muon_row_blocks = (2, 4)
    parts = [torch.nn.Parameter(t.clone()) for t in (*qkv.detach()[:2].reshape(4, 4, 6), qkv.detach()[2])]
    beta2 = 0.95 if normuon else None
    blocked, apart = Muon([qkv], lr=0.1, momentum=0.9, normuon_beta2=beta2), Muon(parts, lr=0.1, momentum=0.9,
                                                                                  normuon_beta2=beta2)
    for _ in range(2):   # the second step reads the first one's momentum and second moments
        g = torch.randn(3, 8, 6)
        qkv.grad = g.clone()
        for part, grad in zip(parts, (*g[:2].reshape(4, 4, 6), g[2])):
            part.grad = grad.clone()
        blocked.step()
        apart.step()
        want = torch.cat([torch.stack([t.detach() for t in parts[:4]]).reshape(2, 8, 6), parts[4].detach()[None]])
        assert torch.allclose(qkv.detach(), want, atol=1e-6)
    if normuon:
        assert blocked.state[qkv]["second_moment_blocks"].shape == (2, 2, 1, 6)   # 4 x 6 blocks: per column
        assert blocked.state[qkv]["second_moment"].shape == (1, 8, 1)


def test_the_blocks_change_the_step_and_the_switch_marks_every_attention():
    from trainer.optim import Muon

    torch.manual_seed(6)
    g = torch.randn(3, 8, 6)
    a, b = torch.nn.Parameter(torch.zeros(3, 8, 6)), torch.nn.Parameter(torch.zeros(3, 8, 6))
    b.muon_row_blocks = (2, 4)
    a.grad, b.grad = g.clone(), g.clone()
    opt = Muon([a, b], lr=0.1)
    assert len(opt.shape_groups) == 2   # one shape, two blockings: two groups
    opt.step()
    assert torch.allclose(a.detach()[2], b.detach()[2], atol=1e-6)   # v: one matrix either way
    assert (a.detach()[:2] - b.detach()[:2]).abs().max() > 1e-3        # q and k: blocks, not whole matrices
    cfg = tiny_config(muon_qk_pairs=True)
    model = randomised_model(cfg)
    marked = [blk.attn.qkv_w.muon_row_blocks for blk in model.blocks if blk.attn is not None]
    assert marked and set(marked) == {(2, 2 * cfg.head_dim)}
    assert not any(hasattr(blk.attn, "qkv_w") and hasattr(blk.attn.qkv_w, "muon_row_blocks")
                   for blk in randomised_model(tiny_config()).blocks if blk.attn is not None)
    with pytest.raises(ValueError, match="^muon_qk_pairs: needs an even num_heads"):
        tiny_config(muon_qk_pairs=True, num_heads=1, head_dim=64)


# ----------------------------------------------------------------------------- Adam every other step (record-39)


def test_adam_steps_on_odd_steps_only_when_asked():
    from trainer.schedules import adam_steps

    assert all(adam_steps(tiny_config(), s) for s in range(6))
    assert [adam_steps(tiny_config(adam_every_other_step=True), s) for s in range(6)] == [False, True] * 3


def test_adam_every_other_step_steps_on_the_sum_of_two_steps_gradients(tmp_path):
    from orchestrator.data.synthetic import markov_shards
    from trainer.model import GPT
    from trainer.train import Trainer
    from trainer.schedules import window_blocks

    markov_shards(tmp_path / "data")
    cfg = tiny_config(adam_every_other_step=True)
    trainer = Trainer(cfg, str(tmp_path / "data"), str(tmp_path / "out"))
    model = trainer.model
    with torch.no_grad():   # the zero-initialised head and projections would leave Muon's gradients at zero
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0, 0.05)
    embed, hidden = model.embed.weight, model.blocks[0].mlp.c_fc.weight
    e0, h0 = embed.detach().clone(), hidden.detach().clone()
    trainer.train_step(trainer.batches.next_step(), 0)
    assert torch.equal(embed, e0) and not torch.equal(hidden, h0)   # Muon stepped, Adam did not
    assert hidden.grad is None and embed.grad is not None and not trainer.adam.state
    g0 = embed.grad.clone()
    batch = trainer.batches.next_step()
    reference = GPT(cfg)   # the fresh gradient of step 1, alone
    reference.load_state_dict(model.state_dict())
    window = torch.tensor(window_blocks(cfg, 1))
    for seq in batch:
        s = torch.from_numpy(seq.astype("int64"))
        (reference(s[:-1], s[1:], window) / cfg.grad_accum_total).backward()
    seen = {}
    adam_step = trainer.adam.step
    trainer.adam.step = lambda: (seen.update(grad=embed.grad.clone()), adam_step())
    trainer.train_step(batch, 1)
    assert torch.allclose(seen["grad"], g0 + reference.embed.weight.grad, atol=1e-7)
    assert not torch.equal(embed, e0) and embed.grad is None


def test_a_step_that_defers_adam_does_not_reduce_its_gradients_across_ranks(monkeypatch):
    import trainer.distributed as distributed

    reduced = []

    class Done:
        def wait(self):
            pass

    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, async_op=False: reduced.append(t) or Done())
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    reducer = distributed.GradientReducer([a, b], world=2, deferrable=[b])
    for defer, want in ((True, [a]), (False, [a, b])):
        reduced.clear()
        reducer.arm(last_micro_batch=True, defer=defer)
        (a.sum() + b.sum()).backward()
        reducer.wait()
        assert sorted(id(t) for t in reduced) == sorted(id(p.grad) for p in want)


# -------------------------------------------------------------------------------- Adam betas by group (record-89)


def test_adam_group_betas_give_each_adam_parameter_its_records_betas_and_step_with_them():
    from trainer.optim import RECORD89_BETAS

    BIGRAM = dict(bigram_embed=True, bigram_rows=1021, bigram_dim=16)

    def betas_of(cfg):
        adam, _ = build_optimizers(model := randomised_model(cfg), cfg)
        return model, {id(p): g["betas"] for g in adam.param_groups for p in g["params"]}, adam

    plain, plain_betas, _ = betas_of(tiny_config(**BIGRAM))
    assert set(plain_betas.values()) == {(0.8, 0.95)}   # off: adam_beta1/2 for all
    model, betas, adam = betas_of(tiny_config(**BIGRAM, adam_group_betas=True))
    assert len(betas) == len(plain_betas)   # the same parameters, regrouped
    head, tables, scalars = RECORD89_BETAS["head"], RECORD89_BETAS["tables"], RECORD89_BETAS["scalars"]
    assert betas[id(model.embed.weight)] == head and betas[id(model.lm_head.weight)] == head
    assert betas[id(model.bigram.table.weight)] == tables
    assert all(betas[id(ve.weight)] == tables for ve in model.value_embeds)
    assert all(betas[id(p)] == scalars for p in model.parameters() if p.ndim < 2)
    lrs = {id(p): g["lr"] for g in adam.param_groups for p in g["params"]}
    cfg = model.cfg
    assert lrs[id(model.embed.weight)] == lrs[id(model.bigram.table.weight)] == cfg.adam_embed_lr

    # two steps of one scalar against Adam's rule written out with the scalars' betas
    p = next(p for p in model.parameters() if p.ndim < 2)
    b1, b2 = scalars
    x, m, v = p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate((torch.full_like(p, 0.3), torch.full_like(p, -0.1)), start=1):
        for q in model.parameters():
            q.grad = torch.zeros_like(q)
        p.grad = g.clone()
        adam.step()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        x = x - cfg.adam_scalar_lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + cfg.adam_eps)
    assert torch.allclose(p.detach(), x, atol=1e-6)

    tied, tied_betas, tied_adam = betas_of(tiny_config(adam_group_betas=True, tie_head_until=0.5))
    assert tied_betas[id(tied.embed.weight)] == head and all(g["params"] for g in tied_adam.param_groups)


def test_adam_cautious_wd_decays_the_tables_where_adams_step_shrinks_them_at_the_schedules_rate():
    BIGRAM = dict(bigram_embed=True, bigram_rows=1021, bigram_dim=16)
    runs = []
    for wd in (0.0, 0.005):
        cfg = tiny_config(**BIGRAM, adam_group_betas=True, adam_cautious_wd=wd)
        torch.manual_seed(0)
        model = randomised_model(cfg)
        adam, _ = build_optimizers(model, cfg)
        torch.manual_seed(1)
        for q in model.parameters():
            q.grad = torch.randn_like(q)
        for g in adam.param_groups:   # the lr schedule at half: the decay at a quarter
            g["lr"] = g["base_lr"] / 2
        before = {n: q.detach().clone() for n, q in model.named_parameters()}
        adam.step()
        runs.append((model, before))
    (plain, p0), (decayed, _) = runs
    rates = {"embed.weight": 0.008 ** 2 * 0.005 * 150 / 4, "lm_head.weight": 0.008 ** 2 * 0.005 * 150 / 4,
             "bigram.table.weight": 0.6 ** 2 * 0.005 * 5 / 4}
    rates.update({n: rates["bigram.table.weight"] for n, _ in plain.named_parameters() if n.startswith("value_embeds")})
    plain_p = dict(plain.named_parameters())
    for n, q in decayed.named_parameters():
        if q.ndim < 2 or n not in rates:   # the scalars, and Muon's matrices (not stepped here): untouched
            assert torch.equal(q, plain_p[n]), n
            continue
        shrinks = (p0[n] - plain_p[n]) * p0[n] > 0
        assert 0 < shrinks.float().mean() < 1, n
        expected = plain_p[n] - rates[n] * p0[n] * shrinks
        assert torch.allclose(q, expected, rtol=2e-7, atol=1e-7), n   # an ulp or so: the decay goes before the step
        assert not torch.equal(q, plain_p[n])
    with pytest.raises(ValueError, match="adam_cautious_wd: must be >= 0"):
        tiny_config(adam_cautious_wd=-1.0)


# ------------------------------------------------------------------------------ logit rescale (record-54)


def test_logit_rescale_is_the_records_asymmetric_sigmoid_up_to_a_constant():
    """record-54: 23*sigmoid((z+5)/7.5) in place of 30*sigmoid(z/7.5); ours is 11.5*tanh((z+5)/15), which differs
    by the constant 11.5, so the loss (a softmax) is the record's exactly."""
    import torch.nn.functional as F

    from trainer.model import GPT

    plain = randomised_model(tiny_config())
    model = GPT(tiny_config(logit_rescale=True))
    model.load_state_dict(plain.state_dict())     # no new parameters: only the cap's form differs
    x = torch.randn(2, 5, 64) * 3
    z = model.lm_head(F.rms_norm(x, (64,)))[..., :model.cfg.vocab_size].float()
    torch.testing.assert_close(model.logits(x), 23 * torch.sigmoid((z + 5) / 7.5) - 11.5, rtol=1e-5, atol=1e-5)
    targets = torch.randint(0, model.cfg.vocab_size, (2, 5))
    record = F.cross_entropy((23 * torch.sigmoid((z + 5) / 7.5)).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(F.cross_entropy(model.logits(x).flatten(0, 1), targets.flatten()), record)
    t = tokens()
    assert model(t[:-1], t[1:], torch.tensor(2)) != plain(t[:-1], t[1:], torch.tensor(2))


# ------------------------------------------------------------- head tied to the embedding until 2/3 (records 51, 53)


def test_the_head_is_tied_before_the_untie_step_only():
    from trainer.schedules import head_tied

    assert not any(head_tied(tiny_config(steps=1545), s) for s in range(1546))   # 0: never tied, as before
    on = tiny_config(steps=1545, tie_head_until=2 / 3)
    assert [head_tied(on, s) for s in (0, 1029, 1030, 1544)] == [True, True, False, False]
    assert head_tied(tiny_config(steps=1880, tie_head_until=2 / 3), 1253)   # record-53: ceil(2/3 * 1880) = 1254
    assert not head_tied(tiny_config(steps=1880, tie_head_until=2 / 3), 1254)
    assert all(head_tied(tiny_config(steps=20, tie_head_until=1.0), s) for s in range(20))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="tie_head_until"):
            tiny_config(tie_head_until=bad)


def tied_and_explicit(**switches):
    """(a randomised tied model, an untied one with the same parameters whose embedding is the head's table)."""
    tied = randomised_model(tiny_config(tie_head_until=0.5, **switches))
    explicit = randomised_model(tiny_config(**switches))
    explicit.load_state_dict(tied.state_dict())
    with torch.no_grad():
        explicit.embed.weight.copy_(tied.lm_head.weight[:explicit.cfg.vocab_size])
        tied.embed.weight.fill_(float("nan"))   # unused while tied: a nan here would show in the loss
    return tied, explicit


def test_tied_model_starts_from_the_records_random_table_not_the_zero_head():
    tied = randomised_model(tiny_config(tie_head_until=0.5))
    w = tied.lm_head.weight
    assert tied.head_tied and w.shape == (50304, 64) and abs(w.std().item() - 0.005) < 1e-4
    plain = GPT_of(tiny_config())
    assert not plain.head_tied and not plain.lm_head.weight.any()   # record-28's zero head when off


def GPT_of(cfg):
    from trainer.model import GPT

    torch.manual_seed(0)
    return GPT(cfg)


@pytest.mark.parametrize("switches", [{}, dict(smear=True, bigram_embed=True, bigram_rows=1021, bigram_dim=16)])
def test_tied_forward_is_the_model_whose_embedding_is_the_head_and_its_gradient_the_sum_of_both_uses(switches):
    tied, explicit = tied_and_explicit(**switches)
    t = tokens()
    loss = tied(t[:-1], t[1:], torch.tensor(2))
    want = explicit(t[:-1], t[1:], torch.tensor(2))
    assert torch.equal(loss, want)
    loss.backward()
    want.backward()
    V = explicit.cfg.vocab_size
    summed = explicit.lm_head.weight.grad.clone()
    summed[:V] += explicit.embed.weight.grad
    assert explicit.embed.weight.grad.abs().sum() > 0 and explicit.lm_head.weight.grad[:V].abs().sum() > 0
    assert torch.allclose(tied.lm_head.weight.grad, summed, rtol=1e-6, atol=1e-9)
    assert tied.embed.weight.grad is None   # the waiting embedding gets nothing: Adam leaves it alone


def test_tied_table_and_the_untied_embedding_train_at_the_heads_adam_rate():
    from trainer.optim import split_parameters

    cfg = tiny_config(tie_head_until=0.5)
    model = randomised_model(cfg)
    parts = split_parameters(model)
    assert [id(p) for p in parts["head"]] == [id(model.lm_head.weight), id(model.embed.weight)]
    assert not any(p is model.embed.weight for p in parts["embed"])
    adam, _ = build_optimizers(model, cfg)
    head_group = [g for g in adam.param_groups if any(p is model.lm_head.weight for p in g["params"])][0]
    assert head_group["lr"] == pytest.approx(0.008) and any(p is model.embed.weight for p in head_group["params"])
    off = randomised_model(tiny_config())
    assert any(p is off.embed.weight for p in split_parameters(off)["embed"])


def test_untie_copies_the_table_and_its_adam_state_to_the_embedding_at_the_untie_step(tmp_path):
    from orchestrator.data.synthetic import markov_shards
    from trainer.train import Trainer

    markov_shards(tmp_path / "data")
    cfg = tiny_config(steps=6, tie_head_until=0.5)   # untied from step 3 on
    trainer = Trainer(cfg, str(tmp_path / "data"), str(tmp_path / "out"))
    model, adam = trainer.model, trainer.adam
    e0 = model.embed.weight.detach().clone()
    for step in range(3):
        trainer.train_step(trainer.batches.next_step(), step)
        assert model.head_tied and torch.equal(model.embed.weight, e0) and model.embed.weight not in adam.state
    head = model.lm_head.weight.detach().clone()
    head_state = {k: v.clone() for k, v in adam.state[model.lm_head.weight].items()}
    trainer.untie_head_if_due(3)
    V = cfg.vocab_size
    assert not model.head_tied and torch.equal(model.embed.weight, head[:V])
    assert torch.equal(model.lm_head.weight, head)
    embed_state, kept = adam.state[model.embed.weight], adam.state[model.lm_head.weight]
    assert embed_state["step"] == head_state["step"] == 3
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(embed_state[k], head_state[k][:V]) and torch.equal(kept[k], head_state[k])
        assert embed_state[k].data_ptr() != kept[k].data_ptr()   # copies, not views
    trainer.train_step(trainer.batches.next_step(), 3)   # from here on two tables, each with its own gradient
    assert not torch.equal(model.embed.weight, model.lm_head.weight[:V])
    assert adam.state[model.embed.weight]["step"] == adam.state[model.lm_head.weight]["step"] == 4


TIED_RUN = dict(steps=6, val_every=6, checkpoint_every=1, tie_head_until=0.5)   # untied at step 3


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory):
    """Markov shards and one uninterrupted 6-step run that unties at step 3, with a checkpoint at every step."""
    from orchestrator.data.synthetic import markov_shards
    from trainer.train import Trainer

    root = tmp_path_factory.mktemp("tied")
    markov_shards(root / "data")
    trainer = Trainer(tiny_config(**TIED_RUN), str(root / "data"), str(root / "a"))
    assert trainer.run() == 0 and not trainer.model.head_tied
    return root, trainer.model.state_dict()


def run_losses(out):
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r.get("train_loss", r.get("val_loss")) for r in rows if "train_loss" in r or r["step"] == 6}


@pytest.mark.parametrize("resume_at", [2, 3, 4])   # before the untie, at its step (saved still tied), after it
def test_resume_across_the_untie_gives_the_uninterrupted_run(tied_run, tmp_path, resume_at):
    import shutil

    from trainer.train import Trainer

    root, final = tied_run
    name = f"step_{resume_at:06d}.pt"
    (tmp_path / "ckpt").mkdir()
    shutil.copy(root / "a" / "ckpt" / name, tmp_path / "ckpt" / name)
    b = Trainer(tiny_config(**TIED_RUN), str(root / "data"), str(tmp_path))
    assert b.model.head_tied and b.run(resume="auto") == 0
    want, got = run_losses(root / "a"), run_losses(tmp_path)
    assert sorted(got) == list(range(resume_at + 1, 7))
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-6)
    for k, v in b.model.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_warm_up_runs_its_last_step_untied_then_puts_the_tied_model_back(tmp_path):
    """The warm-up (untimed) reaches the untie, so the untied graph compiles there, not in the timed loop; then the
    model is tied again with its initial weights. Run eagerly here: the logic is the same compiled."""
    from orchestrator.data.synthetic import markov_shards
    from trainer.train import Trainer

    markov_shards(tmp_path / "data")
    cfg = tiny_config(steps=20, tie_head_until=0.75, warmup_compile_steps=3)   # warm-up steps 0, 6, then 15 (not 13)
    trainer = Trainer(cfg, str(tmp_path / "data"), str(tmp_path / "out"))
    trainer.compiled = True
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    seen, step_fn = [], trainer.train_step

    def train_step(mb, step):   # each warm-up step, and whether the model was tied after it
        loss = step_fn(mb, step)
        seen.append((step, trainer.model.head_tied))
        return loss

    trainer.train_step = train_step
    trainer.warm_up()
    assert seen == [(0, True), (6, True), (15, False)] and trainer.model.head_tied
    assert all(torch.equal(v, initial[k]) for k, v in trainer.model.state_dict().items())
    assert not trainer.adam.state and trainer.model.embed.weight.grad is None


def test_compiled_model_recompiles_once_at_the_untie_and_then_reads_the_embedding():
    from torch._dynamo.testing import CompileCounterWithBackend

    from trainer.model import GPT

    cfg = tiny_config(tie_head_until=0.5)
    torch.manual_seed(0)
    model = GPT(cfg)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    t = tokens()
    assert torch.equal(compiled(t[:-1], t[1:], torch.tensor(2)), model(t[:-1], t[1:], torch.tensor(2)))
    model.untie_head()
    with torch.no_grad():
        model.embed.weight.add_(torch.randn_like(model.embed.weight))   # the untied table now differs from the head's
    eager = model(t[:-1], t[1:], torch.tensor(2))
    for _ in range(2):
        assert torch.allclose(compiled(t[:-1], t[1:], torch.tensor(2)), eager, rtol=1e-6)
    assert counter.frame_count == 2   # the tied graph and the untied one
    model.head_tied = True
    assert not torch.allclose(model(t[:-1], t[1:], torch.tensor(2)), eager, rtol=1e-6)


# ----------------------------------------------------------------------------------- partial key offset (record-49)


def test_partial_key_offset_is_the_records_shift_of_the_stationary_dims():
    from trainer.layers import offset_stationary_keys

    k = torch.randn(2, 9, 3, 16)
    expected = k.clone()   # record-49's in-place form, for head_dim 16
    expected[:, 1:, :, 4:8] = k[:, :-1, :, 4:8]
    expected[:, 1:, :, 12:] = k[:, :-1, :, 12:]
    assert torch.equal(offset_stationary_keys(k), expected)


def test_the_offset_dims_are_the_ones_rotary_leaves_alone_so_the_two_commute():
    from trainer.layers import Rotary, offset_stationary_keys

    rotary, k = Rotary(32), torch.randn(1, 40, 2, 32)
    assert torch.equal(rotary(offset_stationary_keys(k)), offset_stationary_keys(rotary(k)))
    assert not torch.equal(rotary(k)[..., :8], k[..., :8])   # the rotated dims do move, and are not offset


def test_key_offset_sits_on_the_long_window_layers_keeps_the_model_causal_and_changes_it():
    plain, model = randomised_model(tiny_config(num_layers=4)), randomised_model(tiny_config(num_layers=4,
                                                                                             key_offset=True))
    assert model.layout == ["long", "short", "short", "long"]
    assert [b.attn.key_offset for b in model.blocks] == [True, False, False, True]
    t = tokens()
    changed = t.clone()
    changed[300:] = (changed[300:] + 7) % BOS
    a, b = (model(s[:-1], s[1:], torch.tensor(4), reduction="none").detach() for s in (t, changed))
    assert torch.equal(a[:299], b[:299]) and not torch.equal(a[299:], b[299:])
    assert not torch.allclose(a, plain(t[:-1], t[1:], torch.tensor(4), reduction="none").detach())


# ------------------------------------------------------------------------- learned residual scales (record-89)


def test_residual_scales_scale_the_stream_and_each_sublayers_output():
    from trainer.attention import document_ids
    from trainer.layers import norm
    from trainer.model import RESID_SCALE_INIT

    plain, model = with_switches(residual_scales=True)
    block = model.blocks[1]
    assert torch.equal(block.resid_scales, torch.full((2,), RESID_SCALE_INIT)) and torch.equal(block.post_scales,
                                                                                                torch.ones(2))
    t = tokens()
    window = torch.tensor(2)
    with torch.no_grad():
        for b in model.blocks:
            b.resid_scales.fill_(1.0)
    assert torch.equal(model(t[:-1], t[1:], window), plain(t[:-1], t[1:], window))   # r = p = 1: x + f(x), exactly
    with torch.no_grad():
        block.resid_scales.copy_(torch.tensor([0.9, 1.2]))
        block.post_scales.copy_(torch.tensor([0.5, 2.0]))
    x, x0 = torch.randn(1, 512, 64), torch.randn(1, 512, 64)
    docs = document_ids(t[:-1])
    args = (None, docs, 2, 128, None)
    with torch.no_grad():
        block.lambdas[0] = 5.0   # record-28's stream weight: not a second factor beside the record's resid scale
    got = block(x, x0, *args)
    mixed = x + block.lambdas[1] * x0
    after_attn = 0.9 * mixed + 0.5 * block.attn(norm(mixed), *args)
    want = 1.2 * after_attn + 2.0 * block.mlp(norm(after_attn))
    assert torch.allclose(got, want, atol=1e-6)
    model(t[:-1], t[1:], window).backward()
    assert block.resid_scales.grad.abs().min() > 0 and block.post_scales.grad.abs().min() > 0
    adam, muon = build_optimizers(model, model.cfg)
    lr = model.cfg.adam_scalar_lr   # the record's groups: the stream's scales at the scalars' lr, the outputs' at 1/5
    resid, post = (next(g for g in adam.param_groups if any(p is s for p in g["params"]))
                   for s in (block.resid_scales, block.post_scales))
    assert (resid["lr"], post["lr"]) == (lr, lr / 5) and resid["betas"] == post["betas"] == (0.9, 0.95)
    assert len(resid["params"]) == len(post["params"]) == len(model.blocks)
    assert not any(p is block.resid_scales for g in adam.param_groups if g is not resid for p in g["params"])


# --------------------------------------------------------- x0 and bigram after the attention (records 83-89)


def test_inject_after_attention_adds_x0_and_the_bigram_with_the_attentions_output():
    from trainer.attention import document_ids
    from trainer.layers import norm

    _, model = with_switches(inject_after_attention=True, bigram_embed=True, bigram_rows=1021, bigram_dim=16)
    block = model.blocks[1]
    assert block.x0_lambda.item() == 0.0   # the record's x0_lambdas start at 0
    with torch.no_grad():
        block.lambdas.copy_(torch.tensor([0.7, 5.0]))   # record-28's second lambda: unused with the switch
        block.x0_lambda.fill_(0.3)
    t = tokens()
    x, x0, bigram = torch.randn(1, 512, 64), torch.randn(1, 512, 64), torch.randn(1, 512, 64)
    args = (None, document_ids(t[:-1]), 2, 128, None)
    got = block(x, x0, *args, bigram=bigram)
    stream = 0.7 * x
    mixed = stream + block.attn(norm(stream), *args) + 0.3 * x0 + bigram
    assert torch.allclose(got, mixed + block.mlp(norm(mixed)), atol=1e-6)
    block.attn = None   # a layer without attention takes neither term
    assert torch.allclose(block(x, x0, *args, bigram=bigram), stream + block.mlp(norm(stream)), atol=1e-6)


def test_inject_after_attention_puts_layer_zeros_bigram_into_the_stream_before_it():
    """With every later term zero, the switch's model is record-28's form with only layer 0's bigram term, which both
    add before layer 0's attention."""
    _, model = with_switches(inject_after_attention=True, bigram_embed=True, bigram_rows=1021, bigram_dim=16)
    _, plain = with_switches(bigram_embed=True, bigram_rows=1021, bigram_dim=16)
    plain.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        model.bigram.table.weight.normal_()
        plain.bigram.table.weight.copy_(model.bigram.table.weight)
        for m in (model, plain):
            m.bigram_lambdas.copy_(torch.tensor([0.4] + [0.0] * (len(m.blocks) - 1)))
            for b in m.blocks:
                b.lambdas.copy_(torch.tensor([1.0, 0.0]))
    t = tokens()
    window = torch.tensor(2)
    assert torch.allclose(model(t[:-1], t[1:], window), plain(t[:-1], t[1:], window), atol=1e-6)
    with torch.no_grad():
        model.bigram_lambdas[0] = 0.0
    assert not torch.allclose(model(t[:-1], t[1:], window), plain(t[:-1], t[1:], window), atol=1e-4)


def test_inject_after_attention_trains_the_x0_and_bigram_weights_in_their_own_adam_group():
    _, model = with_switches(inject_after_attention=True, bigram_embed=True, bigram_rows=1021, bigram_dim=16)
    with torch.no_grad():
        model.bigram.table.weight.normal_()
    t = tokens()
    model(t[:-1], t[1:], torch.tensor(2)).backward()
    assert all(b.x0_lambda.grad != 0 for b in model.blocks) and model.bigram_lambdas.grad.abs().min() > 0
    adam, _ = build_optimizers(model, model.cfg)
    inject = next(g for g in adam.param_groups if any(p is model.bigram_lambdas for p in g["params"]))
    assert (inject["lr"], inject["betas"]) == (0.008, (0.9, 0.95))   # record-83's x0_lambdas and bigram_lambdas
    assert {id(p) for p in inject["params"]} == {id(model.bigram_lambdas)} | {id(b.x0_lambda) for b in model.blocks}
    assert sum(any(p is model.bigram_lambdas for p in g["params"]) for g in adam.param_groups) == 1
    with pytest.raises(ValueError, match="adam_inject_lr: must be > 0"):
        tiny_config(inject_after_attention=True, adam_inject_lr=0.0)


# ----------------------------------------------------------------------------------------------- all at once


def test_every_switch_on_traces_as_one_graph_and_trains_a_step():
    """fullgraph: no data-dependent Python in the new forward code (torch.compile would break the graph there)."""
    from trainer.model import GPT

    cfg = tiny_config(num_layers=4, smear=True, bigram_embed=True, bigram_rows=1021, bigram_dim=16,
                      value_embed_gate=True, skip_gate=True, muon_variant="normuon", logit_rescale=True,
                      muon_cautious_wd=1.2, muon_momentum_cooldown_steps=5, adam_every_other_step=True,
                      batch_schedule="1/2:1,1:2", tie_head_until=0.5, key_offset=True, paired_head_layers="1",
                      mudd=True, mlp_skip_layers="0", muon_qk_pairs=True, adam_group_betas=True,
                      adam_cautious_wd=0.005, dc_layer=3, dc_gate_layer=2, residual_scales=True,
                      inject_after_attention=True)
    torch.manual_seed(0)
    model = GPT(cfg)
    t = tokens()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(t[:-1], t[1:], torch.tensor(2))
    loss.backward()
    # the batch schedule's steps differ only in how many micro-batches of the one shape they run
    from trainer.schedules import microbatches

    assert (microbatches(cfg, 0), microbatches(cfg, cfg.steps - 1)) == (1, 2)
    with torch._dynamo.config.patch(error_on_recompile=True):
        (compiled(t[:-1], t[1:], torch.tensor(3)) / 2).backward()
    adam, muon = build_optimizers(model, cfg)
    adam.step()
    muon.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())
    ids = [id(p) for opt in (adam, muon) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))   # every parameter in exactly one group


# ------------------------------------------------------------------------------------- paired heads (record-58)


def paired_reference(attn, x, ve, docs, window_blocks, block_size=128):
    """Record-58's paired attention written out pair by pair on the CPU: pair p's heads m * H/2 + p (m = 0, 1)
    form one head over 2T positions, token t's member m at position 2t + m (rotated as that position); causal,
    same-document and block-window rules over those positions; each position's output is its head's at token t."""
    import torch.nn.functional as F

    from trainer.layers import norm

    B, T, _ = x.shape
    H, D = attn.num_heads, attn.head_dim
    q, k, v = (F.linear(x, w).view(B, T, H, D) for w in attn.qkv_w)
    v = attn.lambdas[0] * v + attn.lambdas[1] * ve.view(B, T, H, D)
    cos, sin = attn.rotary.tables(2 * T, x.device)
    pos = torch.arange(2 * T)
    docs2 = docs.repeat_interleave(2)
    allowed = (pos[None, :] <= pos[:, None]) & (docs2[None, :] == docs2[:, None]) \
        & (pos[:, None] // block_size - pos[None, :] // block_size < window_blocks)

    def rotate(u, at):   # u (B, D) at sequence position `at`
        u1, u2 = norm(u).chunk(2, dim=-1)
        return torch.cat([u1 * cos[at] + u2 * sin[at], u2 * cos[at] - u1 * sin[at]], dim=-1)

    y = torch.zeros(B, T, H, D)
    for p in range(H // 2):
        heads = [m * (H // 2) + p for m in (0, 1)]
        qs = torch.stack([rotate(q[:, t, heads[m]], 2 * t + m) for t in range(T) for m in (0, 1)], dim=1)
        ks = torch.stack([rotate(k[:, t, heads[m]], 2 * t + m) for t in range(T) for m in (0, 1)], dim=1)
        vs = torch.stack([v[:, t, heads[m]] for t in range(T) for m in (0, 1)], dim=1)
        scores = (qs @ ks.transpose(1, 2)) * 0.12
        out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ vs   # (B, 2T, D)
        for m in (0, 1):
            y[:, :, heads[m]] = out[:, m::2]
    y = y * torch.sigmoid(attn.gate(x[..., :attn.gate_dims]))[..., None]
    return attn.c_proj(y.reshape(B, T, -1))


def test_paired_heads_compute_the_records_attention_over_interleaved_positions():
    from trainer import attention as attn_impl
    from trainer.layers import Attention

    torch.manual_seed(0)
    attn = Attention(64, 4, 16, gate_dims=12, paired=True)
    with torch.no_grad():
        attn.gate.weight.normal_(0, 0.5)
        attn.c_proj.weight.normal_(0, 0.1)
        attn.lambdas.copy_(torch.tensor([0.7, 0.4]))
    T = 160
    t = tokens(T, starts=(0, 70, 150))[:T]
    docs = attn_impl.document_ids(t)
    x, ve = torch.randn(1, T, 64), torch.randn(1, T, 64)
    for window in (1, 2):   # 128 positions of the 2T sequence is 64 tokens back; 256 reaches every token here
        got = attn(x, ve, docs.repeat_interleave(2), window, 128, None)
        assert torch.allclose(got, paired_reference(attn, x, ve, docs, window), atol=1e-5, rtol=1e-4)
    # the pairing is the point: the same weights as plain heads attend otherwise
    attn.paired = False
    assert not torch.allclose(attn(x, ve, docs, 2, 128, None), got, atol=1e-3)


def test_paired_head_layers_must_be_short_window_layers_of_the_model():
    from trainer.config import TrainConfig
    from trainer.config_rules import attention_layout

    cfg = TrainConfig(paired_head_layers="1,3,6,10").validate()
    assert attention_layout(cfg) == ["long", "paired", "short", "paired", "long", "short", "paired", None, "short",
                                     "short", "paired", "long"]
    for layers, says in [("4", "layer 4 is a long-window layer"), ("7", "layer 7 has no attention"),
                         ("12", "layer 12 does not exist"), ("1;3", "comma-separated")]:
        with pytest.raises(ValueError, match=f"^paired_head_layers: .*{says}"):
            TrainConfig(paired_head_layers=layers).validate()
    with pytest.raises(ValueError, match="num_heads is 3"):
        TrainConfig(num_heads=3, head_dim=256, paired_head_layers="1", muon_qk_pairs=False).validate()


def test_paired_heads_add_no_parameter_keep_the_model_causal_and_change_it():
    cfg = dict(num_layers=4, num_heads=4, head_dim=16)
    plain, model = randomised_model(tiny_config(**cfg)), randomised_model(tiny_config(**cfg, paired_head_layers="1"))
    assert model.layout == ["long", "paired", "short", "long"]
    assert [b.attn.paired for b in model.blocks] == [False, True, False, False]
    model.load_state_dict(plain.state_dict())   # strict: the pairing is a different use of the same weights
    t = tokens()
    changed = t.clone()
    changed[300:] = (changed[300:] + 7) % BOS
    a, b = (model(s[:-1], s[1:], torch.tensor(4), reduction="none").detach() for s in (t, changed))
    assert torch.equal(a[:299], b[:299]) and not torch.equal(a[299:], b[299:])
    assert not torch.allclose(a, plain(t[:-1], t[1:], torch.tensor(4), reduction="none").detach())
