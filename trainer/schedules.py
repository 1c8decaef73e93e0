"""Every schedule of a run as a pure function of (config, step): the lr and its batch scaling, the micro-batches and
their length, the document-length cap, the attention window and YaRN's state at each of its changes, Muon's momentum,
when Adam steps, when the head is tied, the loss weights of the extra targets, and which steps the warm-up compiles.
The training loop (trainer/train.py) reads them; each has a unit test.
"""
from __future__ import annotations

import math

import torch

from trainer.config import TrainConfig


def lr_scale(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, flat, then a linear cool-down to lr_floor (record-28: 0.1) over the last cooldown_frac of
    training; with a batch_schedule (record-46) the flat part is the step's batch_lr_scale and the cool-down runs
    from it to lr_floor x the first phase's (1.0 for all three without one: exact, the same floats as before). Steps
    from cfg.steps on (the extension, the last validation) stay where the cool-down ended."""
    peak, first = batch_lr_scale(cfg, step), batch_lr_scale(cfg, 0)
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    x = min(step / cfg.steps, 1.0)
    if x < 1 - cfg.cooldown_frac or not cfg.cooldown_frac:
        return peak
    w = (1 - x) / cfg.cooldown_frac
    return peak * w + (1 - w) * cfg.lr_floor * first


def _phase_value(phases, cfg: TrainConfig, step: int, default: float) -> float:
    """The value of the phase a step is in (END a Fraction: exact); steps from cfg.steps on (validation only)
    belong to the last phase; `default` without a schedule."""
    for end, value in phases:
        if step < end * cfg.steps:
            return value
    return phases[-1][1] if phases else default


def microbatches(cfg: TrainConfig, step: int) -> int:
    """Micro-batches in this step, over all ranks: its batch_schedule phase's count (record-46), else
    grad_accum_total."""
    return _phase_value(cfg.batch_phases(), cfg, step, cfg.grad_accum_total)


def micro_batch_len(cfg: TrainConfig, step: int) -> int:
    """Tokens in each of this step's micro-batches: its seq_len_schedule phase's (record-46 on 8 GPUs), else
    seq_len."""
    return _phase_value(cfg.seq_len_phases(), cfg, step, cfg.seq_len)


def doc_len_cap(cfg: TrainConfig, step: int) -> int:
    """Tokens a document may put in this step's micro-batches (doc_len_schedule), 0 for whole documents."""
    cap = _phase_value(cfg.doc_len_phases(), cfg, step, 0)
    return cap if cap < micro_batch_len(cfg, step) else 0   # a cap past the micro-batch cuts nothing


def step_tokens(cfg: TrainConfig, step: int) -> int:
    """Training tokens in this step, over all ranks."""
    return microbatches(cfg, step) * micro_batch_len(cfg, step)


def batch_lr_scale(cfg: TrainConfig, step: int) -> float:
    """record-46's lr tied to the batch: (this step's tokens / the full batch's) ** batch_lr_exponent; or the step's
    phase's multiplier of batch_lr_scales (record-89's stage lrs), over the last phase's."""
    phases = cfg.batch_phases() or cfg.seq_len_phases()
    if not phases:
        return 1.0
    scales = cfg.phase_lr_scales()
    if scales:
        return _phase_value([(end, x) for (end, _), x in zip(phases, scales)], cfg, step, 1.0)
    return (step_tokens(cfg, step) / (cfg.grad_accum_total * cfg.seq_len)) ** cfg.batch_lr_exponent


# record-53's multi-token prediction weights over thirds of training: each third's (start, end), a linear ramp
# between them; the record drops a weight once it reaches 0, here it stays 0 (one compiled shape)
MTP_THIRDS = (((1.0, 0.5, 0.25), (1.0, 0.5, 0.0)), ((1.0, 0.5, 0.0), (1.0, 0.0, 0.0)), ((1.0, 0.0, 0.0), (1.0, 0.0, 0.0)))


def record_thirds(cfg: TrainConfig) -> tuple[int, int, int, int]:
    """Where the record's three training stages start and end, in steps: its round(c x steps) of the cumulative
    durations 1/3 and 1/3 + 1/3 (its floats), for the loss weights' stages."""
    return 0, round(cfg.steps / 3), round(cfg.steps * (1 / 3 + 1 / 3)), cfg.steps


def mtp_weights(cfg: TrainConfig, step: int) -> tuple[float, ...]:
    """The weights of the next 1, 2 and 3 tokens' losses at this step (multi_token_prediction), () when off, by
    record_thirds; steps from cfg.steps on end the last third."""
    if not cfg.multi_token_prediction:
        return ()
    ends = record_thirds(cfg)
    third = next((i for i in range(3) if step < ends[i + 1]), 2)
    start, end = ends[third], ends[third + 1]
    t = min(1.0, (step - start) / max(end - start, 1))
    first, last = MTP_THIRDS[third]
    return tuple(a + (b - a) * t for a, b in zip(first, last))


def prefix_weight(cfg: TrainConfig, step: int) -> float:
    """The prefix-token loss's weight at this step (prefix_token_loss, record-88): 0.25 through the first third,
    falling linearly to 0 over the second, 0 after (record_thirds)."""
    if not cfg.prefix_token_loss:
        return 0.0
    ends = record_thirds(cfg)
    if step < ends[1]:
        return 0.25
    if step < ends[2]:
        return 0.25 * (1 - (step - ends[1]) / (ends[2] - ends[1]))
    return 0.0


def loss_weights(cfg: TrainConfig, step: int) -> tuple[float, ...]:
    """The weights of a step's loss targets, as the model takes them: the next tokens' (one, or three with
    multi_token_prediction), then the prefix target's when prefix_token_loss is on; () for plain next-token CE."""
    if not (cfg.multi_token_prediction or cfg.prefix_token_loss):
        return ()
    future = mtp_weights(cfg, step) or (1.0,)
    return future + ((prefix_weight(cfg, step),) if cfg.prefix_token_loss else ())


def window_blocks(cfg: TrainConfig, step: int) -> int:
    """The long sliding window in blocks: the window_schedule's phase, or record-28's window, which grows linearly in
    tokens from 0 to (max - 1/2) blocks (1728 tokens) and is rounded up to whole blocks, at least window_min_blocks;
    so max is reached only at the last 4% of training. Past cfg.steps: extension_window_blocks, if set."""
    if step >= cfg.steps and cfg.extension_window_blocks:
        return cfg.extension_window_blocks
    if cfg.window_phases():
        return _phase_value(cfg.window_phases(), cfg, step, 0)
    x = min(step / cfg.steps, 1.0)
    tokens = (cfg.window_max_blocks * cfg.block_size - cfg.block_size // 2) * x   # the record's float arithmetic
    return max(cfg.window_min_blocks, math.ceil(tokens / cfg.block_size))       # / 128 is exact: same rounding


def val_window_blocks(cfg: TrainConfig, step: int) -> int:
    """The long window a validation at this step attends over: final_val_window_blocks at the end, if set."""
    if step >= cfg.total_steps() and cfg.final_val_window_blocks:
        return cfg.final_val_window_blocks
    return window_blocks(cfg, step)


def window_changes(cfg: TrainConfig) -> list[tuple[int, int, int]]:
    """(step, old, new): each step whose long window differs from the step before's, in order."""
    return [(s, window_blocks(cfg, s - 1), window_blocks(cfg, s)) for s in range(1, cfg.total_steps())
            if window_blocks(cfg, s) != window_blocks(cfg, s - 1)]


def yarn_scales(cfg: TrainConfig, freqs: torch.Tensor, step: int,
                changes: list[tuple[int, int, int]] | None = None) -> tuple[torch.Tensor, float]:
    """Record-31's YaRN state at a step: (a factor for each rotary frequency in `freqs`, the attention scale's
    factor), folded over the window changes up to and including it (window_changes, given or computed). For a
    change from W to W' tokens: r = W / W', each frequency f times r + w (1 - r) with w = clamp((W f / 2 pi - alpha)
    / (beta - alpha), 0, 1), alpha = 1 and beta = 32, so frequencies that turn less than once over the old window
    keep their angles over the new one and those turning 32 times or more keep their speed; the scale times
    1 + 0.2 ln(W' / W). All ones without cfg.yarn."""
    f = freqs.double().clone()
    attn = 1.0
    if not cfg.yarn:
        return torch.ones_like(freqs), attn
    for at, old, new in changes if changes is not None else window_changes(cfg):
        if at > step:
            break
        old_t, new_t = old * cfg.block_size, new * cfg.block_size
        r = old_t / new_t
        w = ((old_t * f / (2 * math.pi) - 1) / (32 - 1)).clamp(0, 1)
        f = f * (r + w * (1 - r))
        attn *= 0.2 * math.log(new_t / old_t) + 1
    scale = torch.where(freqs.double() > 0, f / freqs.double().clamp(min=1e-30), torch.ones_like(f))
    return scale.to(freqs.dtype), attn


def muon_momentum(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up from muon_momentum_warmup_start; with muon_momentum_cooldown_steps, record-39's cool-down:
    linearly back down toward the warm-up start over the run's last that many steps (the extension's too)."""
    cooldown_start = cfg.total_steps() - cfg.muon_momentum_cooldown_steps
    if cfg.muon_momentum_cooldown_steps and step > cooldown_start:
        frac = (step - cooldown_start) / cfg.muon_momentum_cooldown_steps
        return cfg.muon_momentum - frac * (cfg.muon_momentum - cfg.muon_momentum_warmup_start)
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def adam_steps(cfg: TrainConfig, step: int) -> bool:
    """Whether Adam steps after this step: every step, or with adam_every_other_step record-39's odd steps only
    (on the gradients of that step and the one before, summed; Muon still steps every step). Checkpoints hold no
    gradients, so one written after an even step would lose that step's share: keep checkpoint_every and
    stop_check_every even (stop_check_every's default 10 is)."""
    return not cfg.adam_every_other_step or step % 2 == 1


def head_tied(cfg: TrainConfig, step: int) -> bool:
    """Whether the head is still the embedding at this step (tie_head_until): record-53 unties at step
    ceil(2/3 * its scheduled steps), the same arithmetic here (1998 steps: 1332). 0 = never tied, 1 = never untied."""
    return cfg.tie_head_until > 0 and step < math.ceil(cfg.tie_head_until * cfg.steps)


# ------------------------------------------------------------------------------------- the run


def warmup_steps(cfg: TrainConfig, n: int, tied: bool) -> list[int]:
    """The training steps the warm-up runs, so that every graph the loop meets compiles in it: n spread over the
    schedule (the window grows), the last one past the untie while the head is tied, and then the first step of
    each seq_len_schedule phase whose micro-batch length none of them had."""
    steps = [(i * cfg.steps) // n for i in range(n)]
    untie = math.ceil(cfg.tie_head_until * cfg.steps)
    if n > 1 and tied and untie < cfg.steps:
        steps[-1] = max(steps[-1], untie)   # the untied graph compiles here, not in the timed loop
    lengths = {micro_batch_len(cfg, s) for s in steps}
    for end, _ in cfg.seq_len_phases()[:-1]:
        start = math.ceil(end * cfg.steps)   # the next phase's first step
        if start < cfg.steps and micro_batch_len(cfg, start) not in lengths:
            steps.append(start)
            lengths.add(micro_batch_len(cfg, start))
    return steps
