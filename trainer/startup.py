"""Where a seed's start-up time goes, before its first timed step: torchrun's start, the imports, and what the
compile caches gave the warm-up. Imports no torch at load, so the node runner and `python -m trainer` read it too.

    startup_parts(main_started, imports_done) -> {"torchrun_s": ..., "imports_s": ...}
    compile_cache_counts() -> {"fxgraph_cache_hit": 3, "autograd_cache_hit": 2, "unique_graphs": 2, ...}
"""
from __future__ import annotations

import os

SEED_STARTED_ENV = "SPEEDRUN_SEED_STARTED_UNIX"   # set by the node runner when it starts torchrun for a seed
BEFORE_WARMUP = ("torchrun_s", "imports_s", "ranks_and_data_s", "model_s")   # the warm-up line's "before it" parts
# The compile cache's record of this process: whether the warm-up's graphs came from the cache (hits) or compiled
# (misses), by layer: inductor's FX graphs and AOTAutograd's forward+backward pairs; plus dynamo's graph count.
CACHE_COUNTERS = (("inductor", "fxgraph_cache_hit"), ("inductor", "fxgraph_cache_miss"),
                  ("inductor", "fxgraph_cache_bypass"), ("aot_autograd", "autograd_cache_hit"),
                  ("aot_autograd", "autograd_cache_miss"), ("aot_autograd", "autograd_cache_bypass"),
                  ("stats", "unique_graphs"))


def startup_parts(main_started: float, imports_done: float, environ=os.environ) -> dict[str, float]:
    """Where a seed's time went before the trainer's own set-up: torchrun's (from the node's start of it to this
    process's first line; only under the node runner, which says when) and the imports' (torch, triton, ours)."""
    parts = {}
    launched = environ.get(SEED_STARTED_ENV)
    if launched:
        try:
            parts["torchrun_s"] = max(0.0, main_started - float(launched))
        except ValueError:
            pass
    parts["imports_s"] = imports_done - main_started
    return parts


def compile_cache_counts() -> dict[str, int]:
    """CACHE_COUNTERS as {name: count}, the ones above zero, from torch's process-wide counters."""
    from torch._dynamo.utils import counters

    return {name: counters[group][name] for group, name in CACHE_COUNTERS if counters[group][name]}
