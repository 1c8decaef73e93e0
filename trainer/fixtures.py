"""Tiny configurations and models, for the trainer's tests and quick local runs (Markov shards for them:
orchestrator.data.synthetic.markov_shards; the trainer imports nothing from the orchestrator)."""
from __future__ import annotations

from pathlib import Path

from trainer.config import TrainConfig


def tiny_config(**overrides) -> TrainConfig:
    """A model small enough to train on one CPU core in seconds (the vocabulary stays GPT-2's), with record-28's
    parts only: the later records' switches that are on by default (the bigram embedding, NorMuon, paired heads,
    the sequence-length schedule and its stage lrs, CUDA graphs, the V-O init, Muon's q and k by head pairs) are off
    here, and their tests turn them on. So is the trace cache: on, a compile turns torch's caching_precompile on for
    the whole process, and a test compiling in pytest's own process would leave it on for the tests after it."""
    base = dict(num_layers=2, model_dim=64, num_heads=2, head_dim=32, seq_len=512, grad_accum_total=2,
                val_seq_len=1024, val_tokens=4096, steps=20, val_every=10, window_min_blocks=1,
                window_max_blocks=4, block_size=128, warmup_compile_steps=0, device="cpu", compile=False,
                num_value_embeds=1, muon_momentum_warmup_steps=10, log_every=1, attn_skip_layers="",
                bigram_embed=False, muon_variant="muon", paired_head_layers="", seq_len_schedule="",
                batch_lr_scales="", cuda_graphs=False, attn_vo_init=0.0, muon_qk_pairs=False, compile_trace_cache=False)
    base.update(overrides)
    return TrainConfig(**base).validate()


def packed_tokens(n: int, starts=(0,), seed: int = 0):
    """n random GPT-2 tokens (a seeded generator) with a document's first token (BOS) at each of `starts`: one packed
    sequence as the loader gives it, for the model's inputs (t[:-1]) and targets (t[1:])."""
    import torch

    from trainer.data import BOS

    t = torch.randint(0, BOS, (n,), generator=torch.Generator().manual_seed(seed))
    t[list(starts)] = BOS
    return t


def randomised_model(cfg: TrainConfig, std: float = 0.05, device: str = "cpu"):
    """A GPT (seed 0) whose zero-initialised projections and head are filled with noise of this std, so every
    layer carries information (at init they would hide any information flow from a test)."""
    import torch

    from trainer.model import GPT

    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0, std)
    return model
