"""What a valid TrainConfig is: the checks TrainConfig.validate runs, and how its text-valued keys (layer lists and
"END:VALUE" schedules) parse. Each error names the key, says what is wrong and what to write instead.

Pure functions of the config (no torch), so the orchestrator checks a job's `trainer:` keys before any side effect.
"""
from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config import TrainConfig

MLP_FP8_MODES = ("none", "forward", "grad_h", "all")   # mlp_fp8's values (trainer/kernels/linear_relu2.py runs them)


def check(cfg: TrainConfig) -> None:
    """Raise ValueError('key: problem') on the first bad value (TrainConfig.validate)."""
    positive = ["val_tokens", "seq_len", "grad_accum_total", "val_seq_len", "vocab_size", "num_layers",
                "model_dim", "num_heads", "head_dim", "mlp_ratio", "block_size", "steps", "val_every",
                "window_min_blocks", "window_max_blocks", "stop_check_every", "log_every", "attn_scale",
                "adam_smear_gate_lr", "adam_gate_lr", "adam_xsa_lr", "value_embed_init_std", "adam_inject_lr"]
    for k in positive:
        if getattr(cfg, k) <= 0:
            raise ValueError(f"{k}: must be > 0 (got {getattr(cfg, k)})")
    if min(cfg.muon_momentum_cooldown_steps, cfg.muon_cautious_wd, cfg.adam_cautious_wd) < 0:
        raise ValueError("muon_momentum_cooldown_steps, muon_cautious_wd, adam_cautious_wd: must be >= 0 (got "
                         f"{cfg.muon_momentum_cooldown_steps}, {cfg.muon_cautious_wd}, {cfg.adam_cautious_wd})")
    if min(cfg.extension_steps, cfg.extension_window_blocks) < 0:
        raise ValueError(f"extension_steps, extension_window_blocks: must be >= 0, 0 for off (got "
                         f"{cfg.extension_steps}, {cfg.extension_window_blocks})")
    if cfg.muon_variant not in ("muon", "normuon"):
        raise ValueError(f"muon_variant: must be muon or normuon (got {cfg.muon_variant!r})")
    if not 0.0 <= cfg.normuon_beta2 < 1.0:
        raise ValueError(f"normuon_beta2: must be within [0, 1) (got {cfg.normuon_beta2})")
    if not 0.0 <= cfg.tie_head_until <= 1.0:
        raise ValueError(f"tie_head_until: must be within [0, 1], a fraction of the steps (got {cfg.tie_head_until})")
    if not 0.0 <= cfg.lr_floor <= 1.0:
        raise ValueError(f"lr_floor: must be within [0, 1], a fraction of the lr (got {cfg.lr_floor})")
    if not 0.0 <= cfg.cooldown_frac <= 1.0:
        raise ValueError(f"cooldown_frac: must be within [0, 1] (got {cfg.cooldown_frac})")
    if cfg.window_min_blocks > cfg.window_max_blocks:
        raise ValueError("window_min_blocks: must be <= window_max_blocks")
    if cfg.seq_len % cfg.block_size:
        raise ValueError(f"seq_len: must be a multiple of block_size={cfg.block_size} (got {cfg.seq_len})")
    if cfg.attention not in ("auto", "flex", "dense"):
        raise ValueError(f"attention: must be auto, flex or dense (got {cfg.attention!r})")
    if cfg.mlp_kernel not in ("torch", "triton"):
        raise ValueError(f"mlp_kernel: must be torch or triton (got {cfg.mlp_kernel!r})")
    if cfg.attn_prep not in ("torch", "triton"):
        raise ValueError(f"attn_prep: must be torch or triton (got {cfg.attn_prep!r})")
    if cfg.mlp_fp8 not in MLP_FP8_MODES:
        raise ValueError(f"mlp_fp8: must be none, forward, grad_h or all (got {cfg.mlp_fp8!r})")
    if cfg.muon_polynomial not in ("newton_schulz", "polar_express"):
        raise ValueError(f"muon_polynomial: must be newton_schulz or polar_express (got {cfg.muon_polynomial!r})")
    if not -1 <= cfg.attn_input_layer < cfg.num_layers - 1:
        raise ValueError(f"attn_input_layer: must be -1 (off) or a layer before the last, 0..{cfg.num_layers - 2} "
                         f"(got {cfg.attn_input_layer})")
    if not -1 <= cfg.backout_layer < cfg.num_layers - 1:
        raise ValueError(f"backout_layer: must be -1 (off) or a layer before the last, 0..{cfg.num_layers - 2} "
                         f"(got {cfg.backout_layer})")
    if cfg.backout_layer >= 0 and cfg.mudd:
        raise ValueError("backout_layer: mudd has its own backout (mudd_backout); set backout_layer=-1 with mudd")
    if cfg.dc_layer != -1:
        check_dc(cfg)
    if cfg.muon_qk_pairs and cfg.num_heads % 2:
        raise ValueError(f"muon_qk_pairs: needs an even num_heads (got {cfg.num_heads}); or false for off")
    if cfg.attn_vo_init < 0 or (cfg.attn_vo_init and cfg.num_heads * cfg.head_dim != cfg.model_dim):
        raise ValueError(f"attn_vo_init: must be >= 0, and > 0 only with num_heads x head_dim = model_dim "
                         f"(got {cfg.attn_vo_init} with {cfg.num_heads} x {cfg.head_dim} and {cfg.model_dim})")
    if not 0 < cfg.attn_gate_dims <= cfg.model_dim:
        raise ValueError(f"attn_gate_dims: must be within 1..model_dim={cfg.model_dim} (got {cfg.attn_gate_dims})")
    if cfg.bigram_embed and not (0 < cfg.bigram_dim <= cfg.model_dim and cfg.bigram_rows > 1
                                  and cfg.bigram_sign_rows > 0):
        raise ValueError(f"bigram_dim: must be within 1..model_dim={cfg.model_dim}, with bigram_rows > 1 and "
                         f"bigram_sign_rows > 0 (got {cfg.bigram_dim}, {cfg.bigram_rows}, "
                         f"{cfg.bigram_sign_rows})")
    cfg.skipped_attention_layers()
    cfg.skipped_mlp_layers()
    cfg.paired_layers()
    if cfg.mudd:
        check_mudd(cfg)
    cfg.batch_phases()
    cfg.seq_len_phases()
    cfg.doc_len_phases()
    cfg.window_phases()
    if cfg.final_val_window_blocks < 0:
        raise ValueError(f"final_val_window_blocks: must be >= 0, 0 for the training's last window "
                         f"(got {cfg.final_val_window_blocks})")
    if cfg.batch_phases() and cfg.seq_len_phases():
        raise ValueError("batch_schedule, seq_len_schedule: set one of them (seq_len_schedule='' turns off "
                         "the default); the batch grows either in micro-batches or in their length")
    if cfg.batch_lr_exponent < 0:
        raise ValueError(f"batch_lr_exponent: must be >= 0 (got {cfg.batch_lr_exponent})")
    cfg.phase_lr_scales()
    cfg.mlp_lr_scales()
    cfg.value_embed_layer_set()
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device: must be auto, cuda or cpu (got {cfg.device!r})")


def check_mudd(cfg: TrainConfig) -> None:
    """mudd's needs: values as wide as the residual (the connections add one into the other), a last layer
    with attention, and layers enough for two saved ones before it (trainer/mudd.py)."""
    if cfg.num_heads * cfg.head_dim != cfg.model_dim:
        raise ValueError(f"mudd: needs num_heads x head_dim = model_dim (the values take a residual-shaped term; "
                         f"got {cfg.num_heads} x {cfg.head_dim} against {cfg.model_dim}); set mudd=false")
    if cfg.num_layers < 4:
        raise ValueError(f"mudd: needs num_layers >= 4 (it reads layers L/3 and 2L/3 before the last; got "
                         f"{cfg.num_layers})")
    if cfg.num_layers - 1 in cfg.skipped_attention_layers():
        raise ValueError(f"mudd: the last layer ({cfg.num_layers - 1}) takes the connections into its attention "
                         "values; take it out of attn_skip_layers")


def check_dc(cfg: TrainConfig) -> None:
    """dc_layer's needs: a layer with attention of its own heads (not paired), the gate's layer at or before it,
    a band no longer than a block (the GPU path's mask takes key blocks q-1 and q)."""
    own = [i for i, kind in enumerate(attention_layout(cfg)) if kind in ("long", "short")]
    if cfg.dc_layer not in own:
        raise ValueError(f"dc_layer: must be -1 (off) or a layer with attention that is not paired (got "
                         f"{cfg.dc_layer}; layers {', '.join(str(i) for i in own)} qualify)")
    if not 0 <= cfg.dc_gate_layer <= cfg.dc_layer:
        raise ValueError(f"dc_gate_layer: must be within 0..dc_layer={cfg.dc_layer} (got {cfg.dc_gate_layer})")
    if not 1 <= cfg.dc_window <= cfg.block_size:
        raise ValueError(f"dc_window: must be within 1..block_size={cfg.block_size} (got {cfg.dc_window})")


def layer_numbers(key: str, value: object, example: str) -> frozenset[int]:
    """A key's comma-separated layer numbers as a set, empty for ''; ValueError naming the key on anything else."""
    text = str(value).strip()
    if not text:
        return frozenset()
    try:
        return frozenset(int(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"{key}: must be comma-separated layer numbers like {example}, or '' for none "
                         f"(got {value!r})") from None


def layer_set(cfg: TrainConfig, key: str) -> frozenset[int]:
    """A comma-separated list of layers (attn_skip_layers, mlp_skip_layers) as a set; ValueError naming the key on
    anything but layers of this model."""
    layers = layer_numbers(key, getattr(cfg, key), "'7'")
    bad = sorted(i for i in layers if not 0 <= i < cfg.num_layers)
    if bad:
        raise ValueError(f"{key}: layer {bad[0]} does not exist in a {cfg.num_layers}-layer model; "
                         "list layers below num_layers, or '' for none")
    return layers


def paired_layers(cfg: TrainConfig) -> frozenset[int]:
    """paired_head_layers as a set of layer indices; ValueError unless each is a short-window attention layer
    of this model with an even head count."""
    layers = layer_numbers("paired_head_layers", cfg.paired_head_layers, "'1,3,6,10'")
    if not layers:
        return layers
    if cfg.num_heads % 2:
        raise ValueError(f"paired_head_layers: heads go in pairs, and num_heads is {cfg.num_heads}; use an even "
                         "num_heads or '' for none")
    windows = window_layout(cfg)
    for i in sorted(layers):
        if not 0 <= i < cfg.num_layers or windows[i] != "short":
            what = "does not exist" if not 0 <= i < cfg.num_layers else \
                "has no attention" if windows[i] is None else "is a long-window layer"
            short = ",".join(str(j) for j, w in enumerate(windows) if w == "short")
            raise ValueError(f"paired_head_layers: layer {i} {what}; list short-window layers ({short})")
    return layers


def window_layout(cfg: TrainConfig) -> list[str | None]:
    """Each layer's attention window: 'long', 'short' (half of it) or None (no attention in that layer).

    Long where the layer's distance to the nearer end of the stack is a multiple of 4: for 12 layers that is
    0, 4, 7 and 11, record-28's layout (its layer 7 has no attention at all, so 0, 4 and 11 remain)."""
    L, skipped = cfg.num_layers, cfg.skipped_attention_layers()
    return [None if i in skipped else "long" if min(i, L - 1 - i) % 4 == 0 else "short" for i in range(L)]


def attention_layout(cfg: TrainConfig) -> list[str | None]:
    """window_layout with the paired-head layers (short-window ones) marked 'paired'."""
    paired = cfg.paired_layers()
    return ["paired" if i in paired else w for i, w in enumerate(window_layout(cfg))]


def _numbers(text: str) -> tuple[float, ...]:
    """Comma-separated numbers as floats; () when any is not a number (the caller's sentence says what is wanted)."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        return ()


def parse_mlp_lr_scales(text: str) -> tuple[float, float] | None:
    """muon_mlp_lr_scales as (c_fc's, c_proj's) Muon lr multipliers, None when unset (TrainConfig.mlp_lr_scales)."""
    if not text.strip():
        return None
    scales = _numbers(text)
    if len(scales) != 2 or min(scales) <= 0:
        raise ValueError(f"muon_mlp_lr_scales: must be two positive numbers, c_fc's and c_proj's multipliers of "
                         f"muon_lr, e.g. '2,4' (the records since 48); or '' for 1 and 1 (got {text!r})")
    return scales


@lru_cache(maxsize=16)
def parse_lr_scales(text: str, phases: int) -> tuple[float, ...]:
    """batch_lr_scales for a schedule of this many phases (TrainConfig.phase_lr_scales). Cached, as parse_phases:
    the trainer asks for the step's lr every step."""
    if not text.strip():
        return ()
    scales = _numbers(text)
    if not phases:
        raise ValueError("batch_lr_scales: needs a batch_schedule or seq_len_schedule, one multiplier per phase (the "
                         "default 1,1.52,1.73 goes with the default seq_len_schedule); or '' for off")
    if len(scales) != phases or min(scales) <= 0:
        raise ValueError(f"batch_lr_scales: must be {phases} positive numbers, comma-separated, one per phase (the "
                         f"record: 1,1.52,1.73); or '' for batch_lr_exponent's (got {text!r})")
    return tuple(x / scales[-1] for x in scales)


@lru_cache(maxsize=16)
def parse_phases(key: str, text: str, unit: str, low: int, high: int, multiple: int, example: str
                 ) -> tuple[tuple[Fraction, int], ...]:
    """A schedule "END:UNIT,..." as ((END, value), ...): ENDs increasing fractions of the steps, the last 1, each
    value within low..high and a multiple of `multiple`. Cached: the trainer asks for the step's phase every step."""
    if not text.strip():
        return ()
    phases = []
    for part in text.split(","):
        end, sep, value = part.partition(":")
        try:
            phase = (Fraction(end.strip()), int(value))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{key}: {part.strip()!r} is not END:{unit}; write e.g. {example}, "
                             "or '' for off") from None
        if not sep or not 0 < phase[0] <= 1 or not low <= phase[1] <= high or phase[1] % multiple:
            within = f"within {low}..{high}" + (f" and a multiple of {multiple}" if multiple > 1 else "")
            raise ValueError(f"{key}: {part.strip()!r} needs END within (0, 1] and {unit} {within}; or '' for off")
        if phases and phase[0] <= phases[-1][0]:
            raise ValueError(f"{key}: the ENDs must increase ({phases[-1][0]} then {phase[0]})")
        phases.append(phase)
    if phases[-1][0] != 1:
        raise ValueError(f"{key}: the last phase must end at 1 (got {phases[-1][0]}), so every step has one")
    return tuple(phases)
