"""The GPT of the record recipe, read top to bottom (its layers: trainer/layers.py).

Rotary + QK-norm attention with value embeddings and a sparse per-head output gate, ReLU^2 MLP,
zero-initialised output projections, untied embedding and head (tied for a first share of training with
tie_head_until, records 51 and 53), soft-capped logits, U-net skips between early and late blocks, the input
embedding mixed into every block, and no attention in layer 7 (record-28's layout); heads attend in pairs in four
short-window layers (record-58). Weights stay fp32 (the optimizer's copy); matmuls run in the activation dtype (bf16
on the GPU, fp32 on CPU). The FP8 paths run only in training (module.training): validation is bf16, as the record's.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer import attention as attn_impl
from trainer import dc_attention
from trainer.config import TrainConfig
from trainer.config_rules import attention_layout
from trainer.embeddings import BigramHash, Smear
from trainer.fp8 import fp8_linear
from trainer.layers import MLP, Attention, CastedLinear, Rotary, norm
from trainer.mudd import DenseConnections, saved_layers
from trainer.schedules import window_blocks as training_window

ACT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}   # GPT.act_dtype's values, by name
RESID_SCALE_INIT = 1.1 ** 0.5   # record-89's residual scale per sublayer: the stream x1.1 a layer at start

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
        # inject_after_attention (records 83-89): x0 joins with the attention's output, at a weight of its own
        self.x0_lambda = nn.Parameter(torch.zeros(())) if cfg.inject_after_attention else None
        # residual_scales (record-89): per sublayer (attention, MLP) x = resid * x + post * f(x), each in its Adam group
        self.resid_scales = nn.Parameter(torch.full((2,), RESID_SCALE_INIT)) if cfg.residual_scales else None
        self.post_scales = nn.Parameter(torch.ones(2)) if cfg.residual_scales else None

    def forward(self, x, x0, ve, docs, window_blocks, block_size, mask, bigram=None, extra_v=None, attn_in=None,
                dc=None):
        """attn_in: what the attention reads instead of this layer's mixed input (attn_input_layer's saved output).
        bigram: the bigram embedding, already weighted for this layer."""
        # record-28's mix of the stream and the input embedding; with residual_scales the stream's scale is theirs
        # alone, as the record's (lambdas[0] then unused: no gradient, Adam leaves it at 1)
        x = x if self.resid_scales is not None else self.lambdas[0] * x
        late = self.x0_lambda is not None   # inject_after_attention: x0 and the bigram join with the attention
        if not late:
            x = self.inject(x, self.lambdas[1] * x0, bigram)
        if self.attn is not None:
            x = self.add(x, self.attn(norm(x if attn_in is None else attn_in), ve, docs, window_blocks, block_size,
                                      mask, extra_v, dc), 0)
            if late:
                x = self.inject(x, self.x0_lambda.to(x.dtype) * x0, bigram)
        return x if self.mlp is None else self.add(x, self.mlp(norm(x)), 1)

    @staticmethod
    def inject(x: torch.Tensor, x0_term: torch.Tensor, bigram: torch.Tensor | None) -> torch.Tensor:
        x = x + x0_term
        return x if bigram is None else x + bigram

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
            if cfg.inject_after_attention:   # layer 0's term into the stream before it (x0 itself without it)
                x = x0 + self.bigram_lambdas[0].to(act) * bigram
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
                      None if bigram is None or (i == 0 and cfg.inject_after_attention) else
                      self.bigram_lambdas[i] * bigram, extra_v,
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
