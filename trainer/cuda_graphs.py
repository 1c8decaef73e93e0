"""What training under CUDA graphs needs (TrainConfig.cuda_graphs): the compile mode, and gradients that survive
the graphs' replays.

torch.compile's reduce-overhead mode records each compiled graph once and replays it as one CUDA graph launch,
so the host no longer launches a micro-batch's forward and backward kernel by kernel. Its outputs live in the
graphs' own memory pool and are overwritten by the next replay. That is fine for the loss (read at once) and
wrong for gradients: when a parameter's .grad is None, autograd keeps the first micro-batch's gradient tensor
itself as .grad, the next micro-batch's replay writes over it, and the step's sum comes out as the last
micro-batch's gradient alone (pytorch/pytorch#169545; torch 2.11 neither copies nor errors). OwnedGradients
gives every parameter a zeroed .grad of its own before a step's first backward, so each micro-batch adds into
memory the graphs do not own.

    forward = compile_model(model, cfg)
    grads = OwnedGradients(model.parameters())
    grads.before_backward(); [loss(mb).backward() for mb in micro_batches]; grads.after_backward()
"""
from __future__ import annotations

import torch

from trainer import trace_cache


def compile_model(model: torch.nn.Module, cfg):
    """torch.compile with static shapes; with cfg.cuda_graphs its graphs replay as CUDA graphs (reduce-overhead);
    with cfg.compile_trace_cache dynamo's traces are cached too (trainer/trace_cache.py), and a cache that fails to
    load costs a warning and a trace, not the run."""
    if cfg.compile_trace_cache:
        trace_cache.enable(next(model.parameters()).device)
    mode = "reduce-overhead" if cfg.cuda_graphs else None
    try:
        with trace_cache.loading(cfg.cuda_graphs):
            compiled = torch.compile(model, dynamic=False, mode=mode)   # the trace cache loads here
    except Exception as e:  # noqa: BLE001 - whatever an experimental cache's load raises, tracing still works
        if not trace_cache.enabled():
            raise
        trace_cache.disable(e)
        compiled = torch.compile(model, dynamic=False, mode=mode)
    return trace_cache.grads_aside(compiled, model)


def cuda_graph_skips() -> int:
    """How many compiled graphs torch ran without CUDA graphs (a CPU tensor, an input mutation, ...)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


class OwnedGradients:
    """A zeroed .grad of the parameter's own for every parameter without one, before a step's first backward;
    after its last, the ones no micro-batch reached are None again, as they would be without it (the optimizers
    skip a None gradient, not a zero one)."""

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.reached: set[int] = set()
        self.zeroed: list[torch.Tensor] = []
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._reached)

    def _reached(self, p: torch.Tensor) -> None:
        self.reached.add(id(p))

    def before_backward(self) -> None:
        self.reached.clear()
        self.zeroed = [p for p in self.params if p.grad is None]
        for p in self.zeroed:
            p.grad = torch.zeros_like(p)

    def after_backward(self) -> None:
        for p in self.zeroed:
            if id(p) not in self.reached:
                p.grad = None
        self.zeroed = []
