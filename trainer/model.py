"""The GPT of the record recipe, read top to bottom.

Rotary + QK-norm attention with value embeddings and a sparse per-head output gate, ReLU^2 MLP,
zero-initialised output projections, untied embedding and head (tied for a first share of training with
tie_head_until, records 51 and 53), soft-capped logits, U-net skips between early and late blocks, the input
embedding mixed into every block, and no attention in layer 7 (record-28's layout); heads attend in pairs in four
short-window layers (record-58). Weights stay fp32 (the optimizer's copy); matmuls run in the activation dtype (bf16
on the GPU, fp32 on CPU). The FP8 paths run only in training (module.training): validation is bf16, as the record's.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer import attention as attn_impl
from trainer import dc_attention
from trainer.config import TrainConfig
from trainer.config_rules import attention_layout
from trainer.embeddings import BigramHash, Smear
from trainer.fp8 import fp8_forward_linear, fp8_linear
from trainer.mudd import DenseConnections, saved_layers
from trainer.schedules import window_blocks as training_window

ACT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}   # GPT.act_dtype's values, by name
RESID_SCALE_INIT = 1.1 ** 0.5   # record-89's residual scale per sublayer: the stream x1.1 a layer at start

try:   # q/k norm + rotary + value mix as one Triton kernel each way (CUDA); a CPU-only torch has no triton
    import trainer.kernels.attn_prep  # noqa: F401 - registers torch.ops.speedrun.attn_prep
    HAS_ATTN_PREP = True
except ImportError:
    HAS_ATTN_PREP = False

try:
    from trainer.head import head_loss
except ImportError:   # a CPU-only torch without triton: the fused head + loss op is a CUDA path anyway
    head_loss = None

EVAL_SLICE = {"cuda": 32768, "cpu": 1024}   # tokens per slice of the lm-head + loss under no_grad


def future_targets(targets: torch.Tensor, k: int) -> torch.Tensor:
    """(T,) -> (T, k): column j holds the target j positions on (multi-token prediction), -1 (ignored) past the
    end of the sequence."""
    cols = [targets] + [F.pad(targets[j:], (0, j), value=-1) for j in range(1, k)]
    return torch.stack(cols, dim=1)


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """A linear layer whose fp32 weight is cast to the activation dtype at use."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        with torch.no_grad():
            if zero_init:
                self.weight.zero_()
            else:
                bound = math.sqrt(3) * 0.5 * in_features ** -0.5
                self.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    """Rotary embedding on half of each head's dimensions; the other half carries no position."""

    def __init__(self, head_dim: int, base: float = 1024.0):
        super().__init__()
        quarter = head_dim // 4
        freqs = (1.0 / base) ** torch.linspace(0, 1, quarter)
        self.register_buffer("freqs", torch.cat([freqs, freqs.new_zeros(quarter)]), persistent=False)
        # record-31's YaRN state (the trainer sets it from the step, schedules.yarn_scales): a factor on each frequency,
        # and the attention scale's factor, applied as sqrt(factor) on both q and k through the tables. Buffers, so
        # a change is new data for the compiled graph, not a recompile; derived from the step, so not checkpointed
        self.register_buffer("yarn_freqs", torch.ones_like(self.freqs), persistent=False)
        self.register_buffer("yarn_attn", torch.ones(()), persistent=False)

    @torch.no_grad()
    def set_yarn(self, freq_factors: torch.Tensor, attn_factor: float) -> None:
        self.yarn_freqs.copy_(freq_factors)
        self.yarn_attn.fill_(attn_factor)

    def tables(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of each position's angles, (T, head_dim / 2), in fp32: in bf16 they would carry a 2^-9
        error into every rotated q and k (record-28 rotates in fp32 too). Both times sqrt(yarn_attn): the rotation
        scales q and k by it, so their dot products by yarn_attn."""
        theta = torch.outer(torch.arange(T, device=device, dtype=torch.float32), self.freqs * self.yarn_freqs)
        gain = self.yarn_attn.sqrt()
        return theta.cos() * gain, theta.sin() * gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H, D)
        cos, sin = (t[None, :, None, :] for t in self.tables(x.size(1), x.device))
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).to(x.dtype)


def offset_stationary_keys(k: torch.Tensor) -> torch.Tensor:
    """Record-49's partial key offset on k (B, T, H, D): the dims Rotary leaves unrotated (D/4..D/2, 3D/4..D: zero
    frequency, so the offset commutes with the rotation) take position t-1's values; position 0 keeps its own."""
    D = k.size(-1)
    stationary = torch.arange(D, device=k.device) % (D // 2) >= D // 4
    return torch.where(stationary, torch.cat([k[:, :1], k[:, :-1]], dim=1), k)


def exclude_own_value(y: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Record-82's learnable XSA on y and v (B, T, H, D): each head's output loses tanh(alpha[h]) of its component
    along the token's own value, y - tanh(alpha) (y . v / |v|^2) v; at alpha = 0, y unchanged."""
    along = (y * v).sum(-1, keepdim=True) / v.square().sum(-1, keepdim=True).clamp_min(1e-8)
    return y - torch.tanh(alpha).to(y.dtype)[:, None] * along * v


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, prep_kernel: str = "torch",
                 rotary: Rotary | None = None, gate_dims: int = 0, value_gate_dims: int = 0,
                 key_offset: bool = False, paired: bool = False, xsa: bool = False, scale: float = 0.12,
                 exact_window: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        # the softmax's scale: with QK-norm a fixed one, record-28's 0.12 a bit above 1/sqrt(128) (cfg.attn_scale)
        self.scale = scale
        self.exact_window = exact_window   # the window counted in tokens, not blocks (cfg.window_exact)
        self.key_offset = key_offset
        # record-82's learnable XSA strength, one per head, zero at start (tanh(0) = 0: off until trained)
        self.xsa_alpha = nn.Parameter(torch.zeros(num_heads)) if xsa else None
        # record-58's paired heads: head m * H/2 + p is member m of pair p. The projection's rows are reordered so
        # that a token's q, k, v come out as (member, q/k/v, pair, dim): the (T, 2, ...) output is then, as it lies
        # in memory, a sequence of 2T positions (token t's member m at 2t + m) of H/2 heads, and the attention's
        # (2T, H/2) output is the (T, H) one, heads in the same order, with no copy either way
        self.paired = paired
        # record-28's sparse attention gate: each head's output is scaled by sigmoid(w . x[:gate_dims]), w zero at
        # start (every head at 0.5), so a head can learn to switch itself off for tokens where it only adds noise
        self.gate_dims = gate_dims
        self.gate = CastedLinear(gate_dims, num_heads, zero_init=True) if gate_dims else None
        # record-55's value-embedding gate: the value embedding enters each head times 2*sigmoid(w . g) (1 at the zero
        # init) in place of its lambda, g the first dims/2 dims of x and of the value embedding (record-70's input);
        # only layers that get a value embedding have one
        self.value_gate_dims = value_gate_dims
        self.value_gate = CastedLinear(value_gate_dims, num_heads, zero_init=True) if value_gate_dims else None
        hdim = num_heads * head_dim
        bound = math.sqrt(3) * 0.5 * dim ** -0.5
        # q, k, v in one parameter so Muon orthogonalises them as three separate matrices in one batch
        self.qkv_w = nn.Parameter(torch.empty(3, hdim, dim).uniform_(-bound, bound))
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))   # mix of v and the value embedding
        self.rotary = rotary if rotary is not None else Rotary(head_dim)
        self.c_proj = CastedLinear(hdim, dim, zero_init=True)
        self.fp8 = False   # the q, k, v projection's forward in FP8 (set by the trainer on Hopper)
        # the attn_prep kernel on CUDA tensors. A flag, and the op called as torch.ops.speedrun.attn_prep:
        # torch.compile's cache of its traces (caching_precompile) pickles what the module holds and the objects its
        # guards name, and a custom op's own object holds a library handle that does not pickle (trainer/trace_cache.py)
        self.prep = prep_kernel == "triton" and HAS_ATTN_PREP

    @torch.no_grad()
    def mimetic_vo_init_(self, beta: float, noise_std: float = 0.01) -> None:
        """Record-64's mimetic V-O init (Trockman & Kolter, 2023): the value projection sqrt(beta) I and the output
        projection -sqrt(beta) I (per head; with num_heads x head_dim = model_dim, one identity), each plus
        N(0, noise_std) noise to break the symmetry. Each layer then starts adding about -beta times its attended
        input where record-28's zero output projection adds nothing until trained."""
        eye = torch.eye(self.qkv_w.size(1), dtype=self.qkv_w.dtype, device=self.qkv_w.device)
        root = beta ** 0.5
        self.qkv_w[2].copy_(root * eye + noise_std * torch.randn_like(eye))
        self.c_proj.weight.copy_(-root * eye + noise_std * torch.randn_like(eye))

    def forward(self, x, ve, docs, window_blocks, block_size, mask, extra_v=None, dc=None):
        """docs, window_blocks and mask are the sequence's as this layer attends over it: for paired heads, those
        of the 2T-position sequence (GPT.forward builds them). extra_v (B, T, H * D): added to the values as it
        comes (MUDD's term, trainer/mudd.py). dc: the composition weights, band mask and window of record-85's
        dynamically composable attention (trainer/dc_attention.py), added to the heads' outputs."""
        B, T, _ = x.shape
        w = self.qkv_w
        if self.paired:   # (q/k/v, member, pair * dim, dim) -> (member, q/k/v, ...)
            w = w.view(3, 2, -1, w.size(-1)).transpose(0, 1)
        if self.fp8 and self.training and x.is_cuda:   # x is rms-normed: FP8 with a fixed scale
            qkv = fp8_forward_linear(x, w.flatten(end_dim=-2))
        else:
            qkv = F.linear(x, w.flatten(end_dim=-2).to(x.dtype))
        S, H = (2 * T, self.num_heads // 2) if self.paired else (T, self.num_heads)   # positions, heads attending
        qkv = qkv.view(B, S, 3, H, self.head_dim)
        lambdas = self.lambdas
        if self.value_gate is not None and ve is not None:   # the gate takes the place of lambdas[1]
            half = self.value_gate_dims // 2
            gate = 2 * torch.sigmoid(self.value_gate(torch.cat([x[..., :half], ve[..., :half].to(x.dtype)], -1)))
            ve = gate[..., None] * ve.view(B, T, self.num_heads, self.head_dim)
            lambdas = torch.cat([self.lambdas[:1], self.lambdas.new_ones(1)])
        if extra_v is not None:   # one tensor beside v: the value embedding, weighted, plus extra_v, at weight 1
            ve = extra_v if ve is None else lambdas[1] * ve.reshape(extra_v.shape) + extra_v
            lambdas = torch.cat([lambdas[:1], lambdas.new_ones(1)])
        if self.prep and x.is_cuda:   # ve: (B, T, H, D) as laid out is (B, S, H', D) of the paired form
            q, k, v = torch.ops.speedrun.attn_prep(qkv, ve, lambdas, *self.rotary.tables(S, x.device))
        else:
            q, k, v = qkv.unbind(2)
            q, k = self.rotary(norm(q)), self.rotary(norm(k))
            if ve is not None:
                v = lambdas[0] * v + lambdas[1] * ve.view_as(v)
            else:
                v = lambdas[0] * v
        if self.key_offset:
            k = offset_stationary_keys(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = attn_impl.attend(q, k, v, mask, docs, window_blocks, block_size, self.scale, self.exact_window)
        if dc is not None:   # never paired (config): (B, H, T, D) as the attention's
            y = y + dc_attention.correction(q, k, v, dc, docs, self.scale)
        y = y.transpose(1, 2)
        y = y.reshape(B, T, self.num_heads, self.head_dim)   # paired: (B, 2T, H/2, D) read as (B, T, H, D)
        if self.xsa_alpha is not None:   # never paired: there a token's value is not one head's (B, T, H, D)
            y = exclude_own_value(y, v.transpose(1, 2), self.xsa_alpha)
        if self.gate is not None:   # (B, T, H, D) times (B, T, H, 1)
            y = y * torch.sigmoid(self.gate(x[..., :self.gate_dims]))[..., None]
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: int, kernel: str = "torch", lr_scales: tuple[float, float] | None = None):
        super().__init__()
        self.c_fc = CastedLinear(dim, ratio * dim)
        self.c_proj = CastedLinear(ratio * dim, dim, zero_init=True)
        # Muon scales a matrix's lr by sqrt(max(1, rows/cols)); record-28 stores c_fc as (dim, 4*dim), which gives
        # 1, where our (4*dim, dim) layout would give 2
        self.c_fc.weight.muon_lr_scale = 1.0
        if lr_scales is not None:   # muon_mlp_lr_scales: the later records' own multipliers for the two
            self.c_fc.weight.muon_lr_scale, self.c_proj.weight.muon_lr_scale = lr_scales
        self.fused = None
        self.fp8 = "none"   # set by the trainer where the GPU has FP8 tensor cores (mlp_relu2's modes)
        if kernel == "triton":   # relu^2 inside the matmuls' epilogues (imported here: triton only when asked for)
            try:
                from trainer.kernels.linear_relu2 import mlp_relu2
                self.fused = mlp_relu2
            except ImportError:   # a CPU-only torch without triton: the torch path is what runs on CPU anyway
                pass

    def forward(self, x):
        if self.fused is not None and x.is_cuda:
            return self.fused(x, self.c_fc.weight, self.c_proj.weight, fp8=self.fp8 if self.training else "none")
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: TrainConfig, rotary: Rotary | None = None, attention: bool = True, mlp: bool = True,
                 value_gate: bool = False, key_offset: bool = False, paired: bool = False):
        super().__init__()
        self.attn = Attention(cfg.model_dim, cfg.num_heads, cfg.head_dim, cfg.attn_prep, rotary,
                              cfg.attn_gate_dims if cfg.attn_gate else 0,
                              cfg.attn_gate_dims if value_gate else 0, key_offset, paired,
                              xsa=cfg.xsa and not paired, scale=cfg.attn_scale,
                              exact_window=cfg.window_exact) if attention else None
        self.mlp = MLP(cfg.model_dim, cfg.mlp_ratio, cfg.mlp_kernel, cfg.mlp_lr_scales()) if mlp else None
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))   # mix of the residual and the input embedding
        # residual_scales (record-89): per sublayer (attention, MLP) x = resid * x + post * f(x), each in its Adam group
        self.resid_scales = nn.Parameter(torch.full((2,), RESID_SCALE_INIT)) if cfg.residual_scales else None
        self.post_scales = nn.Parameter(torch.ones(2)) if cfg.residual_scales else None

    def forward(self, x, x0, ve, docs, window_blocks, block_size, mask, bigram=None, extra_v=None, attn_in=None,
                dc=None):
        """attn_in: what the attention reads instead of this layer's mixed input (attn_input_layer's saved output)."""
        # record-28's mix of the stream and the input embedding; with residual_scales the stream's scale is theirs
        # alone, as the record's (lambdas[0] then unused: no gradient, Adam leaves it at 1)
        x = (x if self.resid_scales is not None else self.lambdas[0] * x) + self.lambdas[1] * x0
        if bigram is not None:   # the bigram embedding, already weighted for this layer
            x = x + bigram
        if self.attn is not None:
            x = self.add(x, self.attn(norm(x if attn_in is None else attn_in), ve, docs, window_blocks, block_size,
                                      mask, extra_v, dc), 0)
        return x if self.mlp is None else self.add(x, self.mlp(norm(x)), 1)

    def add(self, x: torch.Tensor, out: torch.Tensor, sublayer: int) -> torch.Tensor:
        """The residual plus a sublayer's output; with residual_scales, each of the two scaled by its own scalar."""
        if self.resid_scales is None:
            return x + out
        return self.resid_scales[sublayer].to(x.dtype) * x + self.post_scales[sublayer].to(x.dtype) * out


def padded_vocab(vocab_size: int) -> int:
    """Head rows rounded up to 128: aligned shapes for the (FP8) matmul; extra logits are sliced off."""
    return (vocab_size + 127) // 128 * 128


class GPT(nn.Module):
    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        V, D, L = cfg.vocab_size, cfg.model_dim, cfg.num_layers
        hdim = cfg.num_heads * cfg.head_dim
        # fp32 tables and Adam state, where record-28 casts its embeddings to bf16: a 0.6-lr Adam step on a bf16
        # row rounds away updates below 2^-8 of the entry; the yardstick run kept them fp32 (its 0.802x includes it)
        self.embed = nn.Embedding(V, D)
        self.smear = Smear(cfg.attn_gate_dims) if cfg.smear else None
        self.bigram = BigramHash(cfg.bigram_rows, cfg.bigram_dim, cfg.bigram_sign_rows) if cfg.bigram_embed else None
        self.bigram_lambdas = nn.Parameter(torch.full((L,), 0.05)) if cfg.bigram_embed else None   # record-83's init
        own_tables = sorted(cfg.value_embed_layer_set())   # records 63 and 70: a table per listed layer
        self.value_embeds = nn.ModuleList(nn.Embedding(V, hdim) for _ in own_tables or range(cfg.num_value_embeds))
        if cfg.value_embed_init_std != 1.0:   # nn.Embedding draws N(0, 1): record-28's; only other stds draw again
            for ve in self.value_embeds:
                nn.init.normal_(ve.weight, std=cfg.value_embed_init_std)
        # with the attn_prep kernel, one Rotary for all layers: the compiled graph then computes each micro-batch's
        # cos/sin tables once (common-subexpression elimination needs the same buffer), not once per layer (H200:
        # 0.07 against 0.92 ms/step). The torch path keeps one per layer: shared tables made inductor's q/k
        # norm + rotary kernels 2x slower there (69.6 against 39.6 ms/step), where it otherwise computes the
        # angles inside them.
        rotary = Rotary(cfg.head_dim) if cfg.attn_prep == "triton" else None
        self.layout = attention_layout(cfg)
        # value embedding i feeds layer i and layer L-n+i (early and late layers), none in the middle; or with
        # value_embed_layers, the i-th listed layer alone
        self.ve_of_layer: list[int | None] = [None] * L
        n = cfg.num_value_embeds
        for i in range(0 if own_tables else min(n, L)):
            self.ve_of_layer[i] = i
            self.ve_of_layer[L - n + i] = i
        for table, layer in enumerate(own_tables):
            self.ve_of_layer[layer] = table
        no_mlp = cfg.skipped_mlp_layers()
        self.blocks = nn.ModuleList(
            Block(cfg, rotary, attention=kind is not None, mlp=i not in no_mlp,
                  value_gate=cfg.value_embed_gate and self.ve_of_layer[i] is not None,
                  key_offset=cfg.key_offset and kind == "long", paired=kind == "paired")
            for i, kind in enumerate(self.layout))
        if cfg.attn_vo_init:
            for block in self.blocks:
                if block.attn is not None:
                    block.attn.mimetic_vo_init_(cfg.attn_vo_init)
        if cfg.muon_qk_pairs:   # record-80: Muon takes q's and k's rows a pair of heads at a time (trainer/optim.py)
            for block in self.blocks:
                if block.attn is not None:
                    block.attn.qkv_w.muon_row_blocks = (2, 2 * cfg.head_dim)
        # a last validation over longer windows (final_val_window_blocks) widens the long-window layers only: the
        # short ones stay at most at half the training's longest window, as the record's (its 20 blocks, short 6)
        self.short_cap = max(1, max(training_window(cfg, s) for s in range(cfg.total_steps())) // 2) \
            if cfg.final_val_window_blocks else 0
        self.lm_head = CastedLinear(D, padded_vocab(V), zero_init=True)
        # tie_head_until: the head weight is the embedding table too until untie_head() (record-51 starts the tied
        # table at N(0, 0.005): a zero table would give every token the same zero input). model.embed waits unused.
        self.head_tied = cfg.tie_head_until > 0
        if self.head_tied:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.005)
        self.skip_weights = nn.Parameter(torch.ones(L // 2))
        # record-55's skip gate: every U-net skip also times 2*sigmoid(w . x0[:dims]) (1 at the zero init), one w
        self.skip_gate = CastedLinear(cfg.attn_gate_dims, 1, zero_init=True) if cfg.skip_gate else None
        # record-81's dense connections into and after the last layer (trainer/mudd.py)
        self.mudd = DenseConnections(D, cfg.mudd_backout) if cfg.mudd else None
        # record-85's composition weights for layer dc_layer's attention, from layer dc_gate_layer's input
        self.dc_gate = dc_attention.DCGate(D, cfg.num_heads) if cfg.dc_layer >= 0 else None
        # record-40's backout: the final residual minus this times layer backout_layer's output (a scalar: Adam)
        self.backout_lambda = nn.Parameter(torch.tensor(cfg.backout_init)) if cfg.backout_layer >= 0 else None
        # prefix_token_loss: each token's longest proper byte prefix that is a token, -1 for none; the trainer
        # fills it from the vocabulary (trainer/vocab.py), derived data, so not in checkpoints
        self.register_buffer("prefix_table", torch.full((V,), -1, dtype=torch.int64) if cfg.prefix_token_loss
                             else None, persistent=False)
        self._act_dtype = "float32"   # the activations' dtype by name (act_dtype): see there
        self.attention = "dense"   # dense (CPU) | flex: how attention runs (trainer/attention.py)
        self.fp8_head = False   # the trainer sets these two for its GPU
        self.fused_head_loss = False

    @property
    def act_dtype(self) -> torch.dtype:
        """The activations' dtype (bf16 on the GPU), kept by name: a torch.dtype held by the module would be
        pickled by torch.compile's trace cache as a value it cannot restore (torch 2.13's guard pickler marks it
        missing, and every tensor of that dtype in the guards with it)."""
        return ACT_DTYPES[self._act_dtype]

    @act_dtype.setter
    def act_dtype(self, dtype: torch.dtype) -> None:
        self._act_dtype = next(name for name, d in ACT_DTYPES.items() if d == dtype)

    @torch.no_grad()
    def untie_head(self) -> None:
        """Record-53's untie: the embedding becomes its own table, starting as a copy of the tied one (its first
        vocab_size rows); the head keeps the tied parameter. The optimizer's state is the caller's to copy."""
        self.embed.weight.copy_(self.lm_head.weight[: self.cfg.vocab_size])
        self.head_tied = False

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = norm(x)
        if self.fp8_head and self.training:
            z = fp8_linear(x.flatten(end_dim=-2), self.lm_head.weight).view(*x.shape[:-1], -1)
        else:
            z = self.lm_head(x)
        z = z[..., : self.cfg.vocab_size].float()
        cap, div, offset = self.cfg.softcap_form()
        return cap * torch.tanh((z + offset) / div)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, window_blocks: torch.Tensor,
                reduction: str = "mean", target_weights: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, targets: (T,) one packed sequence; window_blocks: 0-d int tensor. Returns the loss, over the
        targets' count either way. target_weights (K,): the loss of the token k+1 on weighted by target_weights[k]
        (multi-token prediction, record-53), and with a prefix_table the last weight the next token's prefix
        token's (record-88)."""
        cfg = self.cfg
        docs = attn_impl.document_ids(tokens)
        short = torch.clamp(window_blocks // 2, min=1)
        if self.short_cap:   # training's short windows are all below it: only the last validation's is cut
            short = torch.clamp(short, max=self.short_cap)
        # (documents, window, mask) of each layer kind; paired heads attend over 2T positions, the short window
        kinds = {"long": (docs, window_blocks), "short": (docs, short)}
        if "paired" in self.layout:
            kinds["paired"] = (docs.repeat_interleave(2), short)
        if self.attention == "flex":
            kinds = {k: (d, w, attn_impl.flex_block_mask(d, w, cfg.block_size, cfg.window_exact))
                     for k, (d, w) in kinds.items()}
        else:   # dense (the CPU): the window stays a tensor; int() of it broke a compiled model's graph in two
            kinds = {k: (d, w, None) for k, (d, w) in kinds.items()}
        dc_mask = None
        if self.dc_gate is not None and self.attention == "flex":
            dc_mask = dc_attention.flex_band_mask(docs, cfg.dc_window, cfg.block_size)
        # tied: the head's table, padded rows never looked up; a Python flag, so torch.compile recompiles once when
        # it flips
        act = ACT_DTYPES[self._act_dtype]   # not the property: the trace cache cannot name a property's code
        e = (F.embedding(tokens, self.lm_head.weight) if self.head_tied else self.embed(tokens)).to(act)
        if self.smear is not None:
            e = self.smear(e)
        x = x0 = norm(e[None])
        bigram = None
        if self.bigram is not None:   # (1, T, model_dim), zero past bigram_dim
            bigram = F.pad(self.bigram(tokens)[None].to(act), (0, cfg.model_dim - cfg.bigram_dim))
        ves = [ve(tokens)[None].to(act) for ve in self.value_embeds]
        skips, half = [], len(self.skip_weights)
        if self.skip_gate is not None:
            skip_gate = 2 * torch.sigmoid(self.skip_gate(x0[..., :cfg.attn_gate_dims]))   # (1, T, 1)
        # MUDD reads the outputs of layers early and late and the last layer's input
        saved, last_in, (early, late), last = {}, None, saved_layers(len(self.blocks)), len(self.blocks) - 1
        dc = None
        for i, block in enumerate(self.blocks):
            if self.dc_gate is not None and i == cfg.dc_gate_layer:   # the weights from this layer's input
                dc = (*self.dc_gate(x), dc_mask, cfg.dc_window)
            if i >= len(self.blocks) - half and skips:
                skip = skips.pop() if self.skip_gate is None else skip_gate * skips.pop()
                x = x + self.skip_weights[i - (len(self.blocks) - half)] * skip
            ve = ves[self.ve_of_layer[i]] if self.ve_of_layer[i] is not None else None
            layer_docs, window, mask = kinds[self.layout[i] or "short"]   # None: no attention, the MLP only
            extra_v = None
            if self.mudd is not None and i == last:
                last_in = x
                x, extra_v = self.mudd.before_last(x, x0, saved[late])
            x = block(x, x0, ve, layer_docs, window, cfg.block_size, mask,
                      None if bigram is None else self.bigram_lambdas[i] * bigram, extra_v,
                      attn_in=saved.get("attn_input"), dc=dc if i == cfg.dc_layer else None)
            if i == cfg.attn_input_layer:   # record-77: the later layers' attention reads this output
                saved["attn_input"] = x
            if i == cfg.backout_layer:
                saved["backout"] = x
            if i < half:
                skips.append(x)
            if self.mudd is not None and i in (early, late):
                saved[i] = x
        if self.mudd is not None:
            x = self.mudd.after_last(x, x0, saved[late], last_in, ves[0] if ves else None, saved[early])
        if self.backout_lambda is not None:   # record-40: context for later layers, backed out of the prediction
            x = x - self.backout_lambda.to(x.dtype) * saved["backout"]
        x = x[0]
        count = (targets >= 0).sum()
        if target_weights is not None:   # the next tokens' targets, then the prefix target's (the last weight)
            future = future_targets(targets, target_weights.numel() - (self.prefix_table is not None))
            if self.prefix_table is not None:
                prefix = torch.where(targets >= 0, self.prefix_table[targets.clamp(min=0)], -1)
                future = torch.cat([future, prefix[:, None]], dim=1)
            targets = future
        if torch.is_grad_enabled() and not self.fused_head_loss:
            if target_weights is None:
                return F.cross_entropy(self.logits(x), targets, ignore_index=-1, reduction=reduction)
            total = self.summed_loss(x, targets, target_weights)
            return total if reduction == "sum" else total / count
        # one slice when training (the fused op); evaluation goes in slices: the (T, vocab) logits of a long
        # validation sequence would not fit
        n = x.size(0) if torch.is_grad_enabled() else EVAL_SLICE.get(x.device.type, 1024)
        total = sum(self.summed_loss(x[s:s + n], targets[s:s + n], target_weights) for s in range(0, x.size(0), n))
        return total if reduction == "sum" else total / count

    def summed_loss(self, x: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Summed cross-entropy of these rows (targets (T,), or (T, K) with weights (K,)). The fused op keeps the
        logits inside it and computes their gradient in the forward pass; the torch path materialises fp32 logits."""
        if self.fused_head_loss:
            cap, div, offset = self.cfg.softcap_form()
            return head_loss(norm(x), self.lm_head.weight, targets, self.cfg.vocab_size, cap,
                             fp8=self.fp8_head and self.training, div=div, offset=offset, weights=weights)
        logits = self.logits(x)
        if weights is None:
            return F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum")
        return sum(weights[k] * F.cross_entropy(logits, targets[:, k], ignore_index=-1, reduction="sum")
                   for k in range(targets.size(1)))
