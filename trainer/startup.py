"""Where a seed's start-up time goes, before its first timed step: torchrun's start, the imports, and what the
compile caches gave the warm-up. Imports no torch at load, so the node runner and `python -m trainer` read it too.

    startup_parts(main_started, imports_done) -> {"torchrun_s": ..., "imports_s": ...}
    compile_cache_counts() -> {"fxgraph_cache_hit": 3, "autograd_cache_hit": 2, "unique_graphs": 2, ...}
    compile_phases() -> {"dynamo_s": 2.1, "backend_s": 3.0, "cache_load_s": 2.4, ...}
"""
from __future__ import annotations

import os

SEED_STARTED_ENV = "SPEEDRUN_SEED_STARTED_UNIX"   # set by the node runner when it starts torchrun for a seed
# the warm-up line's "before it" parts; compile_s is the torch.compile call, where the trace cache loads
BEFORE_WARMUP = ("torchrun_s", "imports_s", "ranks_and_data_s", "model_s", "compile_s", "setup_s")
# The compile cache's record of this process: whether the warm-up's graphs came from the cache (hits) or compiled
# (misses), by layer: inductor's FX graphs and AOTAutograd's forward+backward pairs; plus dynamo's graph count.
CACHE_COUNTERS = (("inductor", "fxgraph_cache_hit"), ("inductor", "fxgraph_cache_miss"),
                  ("inductor", "fxgraph_cache_bypass"), ("aot_autograd", "autograd_cache_hit"),
                  ("aot_autograd", "autograd_cache_miss"), ("aot_autograd", "autograd_cache_bypass"),
                  ("stats", "unique_graphs"))
# Where torch.compile's time went in this process, from the timers torch keeps per compile phase (nested: the
# backend's time holds the cache's load, which holds the compiled modules' load): ours name -> torch's timer names
COMPILE_PHASES = {
    "dynamo_s": ("_compile.compile_inner",),                  # every frame's compile, the backend's time inside it
    "tracing_s": ("bytecode_tracing",),                       # dynamo reading the model's Python
    "backend_s": ("OutputGraph.call_user_compiler",),         # AOTAutograd + inductor, or their caches
    "cache_load_s": ("AOTAutogradCache.inductor_load",),      # a cache hit's graphs loaded
    "module_load_s": ("PyCodeCache.load_by_key_path",),       # compiled modules imported, their kernels loaded
    "cache_keys_s": ("CacheBase.get_system.triton_key", "inductor_codecache_torch_key"),   # hashing installs
    "kernel_compile_s": ("async_compile.wait",),              # waiting on kernels still compiling
    "guards_s": ("build_guards",),
    "backward_compile_s": ("backward._backward_impl",),       # a compiled backward's lazy first call
}


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


def compile_phases() -> dict[str, float]:
    """COMPILE_PHASES as {name: seconds}, the ones torch timed, rounded to 10 ms."""
    from torch._dynamo.utils import compilation_time_metrics

    out = {}
    for name, timers in COMPILE_PHASES.items():
        times = [t for timer in timers for t in compilation_time_metrics.get(timer, ())]
        if times:
            out[name] = round(sum(times), 2)
    return out
