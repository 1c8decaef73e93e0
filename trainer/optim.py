"""Muon for the hidden matrices (orthogonalised Nesterov momentum, sharded across ranks) and Adam for the rest.

Every rank keeps the full momentum (an elementwise update, cheap) but orthogonalises only its share of
the matrices, then the shares are all-gathered. So the expensive part is split over ranks, a checkpoint
from rank 0 holds the whole state, and any number of ranks gives the same update.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.kernels.cautious_decay import cautious_decay_, cautious_decay_reference_

# Polar Express (Amsel et al., 2025): one odd quintic per iteration, tuned so five bf16 iterations bring
# every singular value close to 1; plain Newton-Schulz repeats one fixed quintic and stops near [0.7, 1.2].
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NEWTON_SCHULZ = ((3.4445, -4.7750, 2.0315),) * 5   # record-28's
# each polynomial with the margin its coefficients were tuned for (Polar Express: 2% for bf16; record-28: none)
POLYNOMIALS = {"newton_schulz": (NEWTON_SCHULZ, 1.0), "polar_express": (POLAR_EXPRESS, 1.02)}


def orthogonalize(G: torch.Tensor, coeffs=POLAR_EXPRESS, dtype=torch.bfloat16, margin: float = 1.02) -> torch.Tensor:
    """Approximate U V^T of G = U S V^T for the last two dims, with odd matrix polynomials in low precision."""
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:                                  # iterate on the smaller Gram matrix
        X = X.mT
    # spectral norm <= Frobenius norm, so this puts every singular value in (0, 1]
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * margin + 1e-7)
    for a, b, c in coeffs:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


def cautious_weight_decay(update: torch.Tensor, params: torch.Tensor, rate: float) -> torch.Tensor:
    """update + rate * params wherever update and params agree in sign, update elsewhere: record-43's cautious
    decay, applied only where the step -lr * update already shrinks |params|, never against the update."""
    return update + rate * (update * params >= 0) * params


def normuon(update: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NorMuon (record-41, 2025-10-24; arXiv 2510.05491): each neuron's share of an orthogonalised update is
    divided by the root of a running mean of its squares, then the matrix is rescaled to its old Frobenius
    norm, so rows (or columns, for wide matrices) that keep getting large updates get smaller ones.

    update: (..., rows, cols); second_moment: (..., rows, 1), or (..., 1, cols) where rows < cols.
    Returns (the new update, the new second moment), both float32."""
    v = update.float()
    per_row = v.size(-2) >= v.size(-1)
    second = second_moment.lerp(v.square().mean(dim=-1 if per_row else -2, keepdim=True), 1 - beta2)
    scaled = v / second.sqrt().clamp_min(1e-10)
    scaled = scaled * (v.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))
    return scaled, second


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised; lr scaled by sqrt(max(1, rows/cols)) as in the record, or by a matrix's
    own `muon_lr_scale` attribute where the record lays that matrix out the other way round. A parameter with a
    `muon_row_blocks` attribute (n, rows) has its first n matrices (along dim 0) treated as blocks of `rows` rows,
    each its own matrix for the orthogonalisation and NorMuon: record-80's per-head-pair groups of Q and K.

    With a process group, the matrices of each shape are split into one contiguous slice per rank; each
    rank orthogonalises its slice as one batch and the slices are all-gathered.

    Later records' options, off unless given: normuon_beta2 (NorMuon, record-41) rescales each neuron's share of
    the gathered update; cautious_wd (record-43) then adds the cautious weight decay.
    """

    def __init__(self, params, lr=0.05, momentum=0.95, nesterov=True, polynomial="newton_schulz", group=None,
                 cautious_wd=0.0, normuon_beta2=None):
        params = list(params)
        super().__init__([{"params": params}], dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                                    cautious_wd=cautious_wd, normuon_beta2=normuon_beta2))
        self.coeffs, self.margin = POLYNOMIALS[polynomial]
        self.group = group
        by_shape: dict[tuple, list] = {}
        for p in params:   # one lr scale and one blocking per group, so matrices with their own group apart
            key = (tuple(p.shape), getattr(p, "muon_lr_scale", None), getattr(p, "muon_row_blocks", None))
            by_shape.setdefault(key, []).append(p)
        self.shape_groups = list(by_shape.values())

    def _world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.group), dist.get_world_size(self.group)
        return 0, 1

    @torch.no_grad()
    def step(self):
        hp = self.param_groups[0]
        lr, mom = hp["lr"], hp["momentum"]
        live = [p for p in hp["params"] if p.grad is not None]
        for p in live:
            if "momentum" not in self.state[p]:
                self.state[p]["momentum"] = torch.zeros_like(p)
        # one multi-tensor kernel per update instead of one per matrix: the optimizer step is launch-bound
        grads, bufs = [p.grad for p in live], [self.state[p]["momentum"] for p in live]
        if live:
            torch._foreach_lerp_(bufs, grads, 1 - mom)
        dirs = torch._foreach_lerp(grads, bufs, mom) if hp["nesterov"] and live else bufs
        directions = dict(zip(live, dirs))
        rank, world = self._world()
        for params in self.shape_groups:
            params = [p for p in params if p in directions]
            if not params:
                continue
            # rank r owns a contiguous slice of k matrices of this shape and orthogonalises them in one batch
            k = -(-len(params) // world)
            mine = params[rank * k:(rank + 1) * k]
            stack = torch.zeros((k, *params[0].shape), dtype=torch.bfloat16, device=params[0].device)
            if mine:
                stack[:len(mine)] = torch.stack([directions[p] for p in mine])
            blocks = getattr(params[0], "muon_row_blocks", None)
            update = join_blocks([orthogonalize(part, self.coeffs, margin=self.margin)
                                  for part in split_blocks(stack, blocks)], blocks)
            if world > 1:
                gathered = [torch.empty_like(update) for _ in range(world)]
                dist.all_gather(gathered, update, group=self.group)
                update = torch.cat(gathered)
            update = update[:len(params)].to(params[0].dtype)
            if hp.get("normuon_beta2") is not None:   # every rank keeps every matrix's second moment (elementwise)
                update = self._normuon(params, update, hp["normuon_beta2"], blocks)
            if hp.get("cautious_wd"):   # the decay's rate is lr * wd: it follows the lr schedule (record-43)
                update = cautious_weight_decay(update, torch.stack(params), lr * hp["cautious_wd"])
            override = getattr(params[0], "muon_lr_scale", None)
            if blocks is None:
                scale = override if override is not None else lr_scale_of(params[0])
            else:   # each part at its own matrices' scale (record-80's blocks: 1, as the whole matrices')
                update = join_blocks([part * (override if override is not None else lr_scale_of(part))
                                      for part in split_blocks(update, blocks)], blocks)
                scale = 1.0
            torch._foreach_add_(params, list(update.unbind()), alpha=-lr * scale)

    def _normuon(self, params, update, beta2, blocks=None):
        """NorMuon on each matrix of the update (each block, with muon_row_blocks); its second moments kept per
        parameter, one tensor per part (state "second_moment", and "second_moment_blocks" for the blocks)."""
        parts = split_blocks(update, blocks)
        names = ["second_moment"] if blocks is None else ["second_moment_blocks", "second_moment"]
        out = []
        for part, name in zip(parts, names):
            for p in params:
                if name not in self.state[p]:
                    rows, cols = part.shape[-2:]
                    shape = (*part.shape[1:-1], 1) if rows >= cols else (*part.shape[1:-2], 1, cols)
                    self.state[p][name] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            moments = [self.state[p][name] for p in params]
            new, second = normuon(part, torch.stack(moments), beta2)
            torch._foreach_copy_(moments, list(second.unbind()))
            out.append(new)
        return join_blocks(out, blocks).to(params[0].dtype)


def lr_scale_of(matrices: torch.Tensor) -> float:
    """Muon's lr scale for matrices of this shape (the last two dims): sqrt(max(1, rows/cols)), as the record."""
    return max(1.0, matrices.size(-2) / matrices.size(-1)) ** 0.5


def split_blocks(stack: torch.Tensor, blocks: tuple[int, int] | None) -> list[torch.Tensor]:
    """A stack (k, m, rows, cols) of k parameters as the matrices Muon treats one by one: itself, or with blocks
    (n, r) its first n matrices cut into blocks of r rows, (k, n, rows / r, r, cols), and the rest (k, m - n, rows,
    cols)."""
    if blocks is None:
        return [stack]
    n, r = blocks
    return [stack[:, :n].unflatten(-2, (-1, r)), stack[:, n:]]


def join_blocks(parts: list[torch.Tensor], blocks: tuple[int, int] | None) -> torch.Tensor:
    """split_blocks undone."""
    return parts[0] if blocks is None else torch.cat([parts[0].flatten(-3, -2), parts[1]], dim=1)


def split_parameters(model) -> dict[str, list]:
    """Hidden matrices go to Muon; embeddings, the head and scalar gains go to Adam. The later records' parts go
    where the current record puts them: the bigram table with the embeddings; the smear gate, the value-embedding
    gates, the skip gate, XSA's strengths, MUDD's nets and the composition weights' net (dc_layer) each in an Adam
    group of their own (record-34 trained the smear gate and record-55 the value gates with Muon; records 52 and 70
    moved them); the smear's and the bigram's weights (vectors) go with the scalars. With the head tied to the
    embedding (tie_head_until), the token embedding goes with the head: records 51 and 53 train the tied table and,
    after the untie, the embedding at the head's lr."""
    tied = model.cfg.tie_head_until > 0
    embed = ([] if tied else [model.embed.weight]) + [ve.weight for ve in model.value_embeds]
    if getattr(model, "bigram", None) is not None:
        embed.append(model.bigram.table.weight)   # record-62/83: the bigram table at the embeddings' 75x Adam lr
    head = [model.lm_head.weight] + ([model.embed.weight] if tied else [])
    attns = [b.attn for b in model.blocks if b.attn is not None]
    gates = [a.value_gate.weight for a in attns if a.value_gate is not None]   # record-70 on: Adam
    xsa = [a.xsa_alpha for a in attns if a.xsa_alpha is not None]   # record-82: Adam at its base lr
    smear_gate = [model.smear.gate] if getattr(model, "smear", None) is not None else []   # record-52 on: Adam
    apart = {id(p) for p in gates}
    hidden = [p for b in model.blocks for n, p in b.named_parameters() if p.ndim >= 2 and id(p) not in apart]
    skip_gate = [model.skip_gate.weight] if getattr(model, "skip_gate", None) is not None else []   # record-55: Adam
    mudd = list(model.mudd.parameters()) if getattr(model, "mudd", None) is not None else []   # record-81: Adam
    dc = list(model.dc_gate.parameters()) if getattr(model, "dc_gate", None) is not None else []   # record-85: Adam
    resid = [b.resid_scales for b in model.blocks if b.resid_scales is not None]   # record-89: groups of their own
    post = [b.post_scales for b in model.blocks if b.post_scales is not None]
    inject = []   # inject_after_attention: the x0 and bigram weights, as the records' x0_lambdas and bigram_lambdas
    if model.cfg.inject_after_attention:
        inject = [b.x0_lambda for b in model.blocks] + ([model.bigram_lambdas] if model.bigram is not None else [])
    own = {id(p) for p in dc + resid + post + xsa + inject}
    scalars = [p for p in model.parameters() if p.ndim < 2 and id(p) not in own]
    parts = {"embed": embed, "head": head, "hidden": hidden, "scalars": scalars, "skip_gate": skip_gate,
             "smear_gate": smear_gate, "gates": gates, "xsa": xsa, "mudd": mudd, "dc": dc, "resid": resid, "post": post,
             "inject": inject}
    seen = [id(p) for group in parts.values() for p in group]
    missing = [n for n, p in model.named_parameters() if id(p) not in seen]
    if missing or len(seen) != len(set(seen)):
        raise RuntimeError(f"parameters with no optimizer or two: {missing or 'one in two groups'}")
    return parts


def copy_adam_state(adam: torch.optim.Adam, src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst's Adam state becomes a copy of src's (moments cut to dst's rows, the same step count): record-53's untie
    hands the tied table's state to the embedding. With no state for src yet, dst starts fresh too."""
    adam.state.pop(dst, None)
    if src in adam.state:
        rows = dst.size(0)
        adam.state[dst] = {k: (v[:rows] if v.ndim and v.shape == src.shape else v).clone()
                           for k, v in adam.state[src].items()}


# record-89's Adam settings by parameter group: betas (adam_group_betas), and the (lr, wd multiplier) its cautious
# decay of the tables is computed from (adam_cautious_wd): its head and token embedding train at lr 0.008 with
# 150x the decay, its value and bigram tables at 0.6 with 5x, its scalars undecayed
RECORD89_BETAS = {"head": (0.5, 0.95), "tables": (0.75, 0.95), "scalars": (0.9, 0.99)}
RECORD89_DECAY = {"head": (0.008, 150.0), "tables": (0.6, 5.0)}


class CautiousAdam(torch.optim.Adam):
    """torch's Adam, with record-89's cautious decay on the groups that carry a `decay` rate: p -= rate * p where
    Adam's step moves p towards zero, the rate following the lr schedule squared (the record's lr * lr * wd), so
    that it falls to lr_floor^2 of itself in the cool-down. Groups without one step as plain Adam.

    The decay (trainer/kernels/cautious_decay.py, one pass a table on a GPU) goes first, with no copy of the
    tables: Adam's step (no weight decay in it) does not depend on p, and its sign is that of the new first moment
    beta1 * m + (1 - beta1) * g, so p0 - step - rate * p0 * mask is the same taken in either order (up to
    rounding)."""

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            if not g.get("decay"):
                continue
            rate, beta1 = g["decay"] * (g["lr"] / g["base_lr"]) ** 2, g["betas"][0]
            for p in g["params"]:
                if p.grad is None:
                    continue
                decay = cautious_decay_ if p.is_cuda else cautious_decay_reference_   # one pass a table on a GPU
                decay(p, p.grad, self.state.get(p, {}).get("exp_avg"), beta1, rate)
        return super().step(closure)


def adam_groups(model, cfg, parts: dict) -> list[dict]:
    """Adam's groups: record-28's three (embeddings, head, scalars), or with record-89's settings by group
    (adam_group_betas, adam_cautious_wd) four, the token embedding apart from the value and bigram tables."""
    if not (cfg.adam_group_betas or cfg.adam_cautious_wd):
        return [dict(params=parts["embed"], lr=cfg.adam_embed_lr), dict(params=parts["head"], lr=cfg.adam_head_lr),
                dict(params=parts["scalars"], lr=cfg.adam_scalar_lr)]

    def group(params, lr, kind):
        g = dict(params=params, lr=lr)
        if cfg.adam_group_betas:
            g["betas"] = RECORD89_BETAS[kind]
        if cfg.adam_cautious_wd and kind in RECORD89_DECAY:
            record_lr, multiplier = RECORD89_DECAY[kind]
            g["decay"] = record_lr * record_lr * cfg.adam_cautious_wd * multiplier
        return g

    token = [p for p in parts["embed"] if p is model.embed.weight]
    tables = [p for p in parts["embed"] if p is not model.embed.weight]
    groups = [group(token, cfg.adam_embed_lr, "head"), group(tables, cfg.adam_embed_lr, "tables"),
              group(parts["head"], cfg.adam_head_lr, "head"), group(parts["scalars"], cfg.adam_scalar_lr, "scalars")]
    return [g for g in groups if g["params"]]   # tied (tie_head_until), the token embedding is in the head's


def build_optimizers(model, cfg, group=None) -> tuple[torch.optim.Adam, Muon]:
    parts = split_parameters(model)
    groups = adam_groups(model, cfg, parts)
    # the gates at the current record's betas (0.9, 0.99), XSA's strengths at record-82's (0.9, 0.95), the x0 and
    # bigram weights of inject_after_attention at record-83's (0.9, 0.95)
    for name, lr, betas in (("skip_gate", cfg.adam_skip_gate_lr, (0.9, 0.99)),
                            ("smear_gate", cfg.adam_smear_gate_lr, (0.9, 0.99)),
                            ("gates", cfg.adam_gate_lr, (0.9, 0.99)), ("xsa", cfg.adam_xsa_lr, (0.9, 0.95)),
                            ("inject", cfg.adam_inject_lr, (0.9, 0.95))):
        if parts[name]:
            groups.append(dict(params=parts[name], lr=lr, betas=betas))
    if parts["mudd"]:   # the record's own betas for its MUDD nets
        groups.append(dict(params=parts["mudd"], lr=cfg.adam_mudd_lr, betas=(0.9, 0.99)))
    if parts["dc"]:   # record-85's gate net, at the record's betas too
        groups.append(dict(params=parts["dc"], lr=cfg.adam_dc_lr, betas=(0.9, 0.99)))
    if parts["resid"]:   # record-89's residual scales: the stream's at the scalars' lr, the outputs' at a fifth of it
        groups += [dict(params=parts["resid"], lr=cfg.adam_scalar_lr, betas=(0.9, 0.95)),
                   dict(params=parts["post"], lr=cfg.adam_scalar_lr / 5, betas=(0.9, 0.95))]
    adam = CautiousAdam(
        groups,
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
        **({"fused": True} if model.embed.weight.is_cuda else {"foreach": True}))   # one kernel for all on GPU
    muon = Muon(parts["hidden"], lr=cfg.muon_lr, momentum=cfg.muon_momentum, polynomial=cfg.muon_polynomial,
                group=group, cautious_wd=cfg.muon_cautious_wd,
                normuon_beta2=cfg.normuon_beta2 if cfg.muon_variant == "normuon" else None)
    for opt in (adam, muon):
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return adam, muon
