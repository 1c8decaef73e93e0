"""The model's layers below the block: the rms norm, the fp32-weight linear, the rotary embedding, the attention
sublayer (QK-norm, value embeddings and their gate, the sparse output gate, paired heads, the key offset and
learnable XSA), and the ReLU^2 MLP. trainer/model.py puts them together into blocks and the GPT; trainer/attention.py
is the masked attention itself (FlexAttention on the GPU, dense on the CPU)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer import attention as attn_impl
from trainer import dc_attention
from trainer.fp8 import fp8_forward_linear

try:   # q/k norm + rotary + value mix as one Triton kernel each way (CUDA); a CPU-only torch has no triton
    import trainer.kernels.attn_prep  # noqa: F401 - registers torch.ops.speedrun.attn_prep
    HAS_ATTN_PREP = True
except ImportError:
    HAS_ATTN_PREP = False


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
