"""dynamo's cache of its own traces (torch's experimental `caching_precompile`), for TrainConfig.compile_trace_cache.

The compile caches the node runner carries (TORCHINDUCTOR_CACHE_DIR) hold inductor's output, not dynamo's trace:
a warm process still reads the model's Python once per compiled graph (3.5-4.2 s a graph on an H100, once per
micro-batch length and once for validation; bench/NOTES.md). With caching_precompile on before torch.compile,
dynamo records what it traced (the bytecode, its guards, the backend's artifacts); `save()` writes that under the
same cache folder (`<TORCHINDUCTOR_CACHE_DIR>/dynamo/<device>/`), so it travels with the rest, and the next process's
torch.compile of the model loads it, so that its first call does not trace. On one H100 (torch 2.11, 2026-12-08) a
warm launch's warm-up fell from 24.4 s to 3.6 s, with the same loss (bench/NOTES.md).

    enable(device)              # before torch.compile (trainer/cuda_graphs.py compile_model)
    with loading(cuda_graphs):  # the load, inside torch.compile: its guards' tracing context, CUDA graphs as asked
        forward = grads_aside(torch.compile(model, mode=...), model)
    ...the warm-up compiles every graph...
    save()                      # after it, if this process traced anything; a failure only warns

The cache keeps fewer guards than a trace does: it drops the ones on the identity of functions and modules (which
`F.relu` or `attn_impl.attend` is), keeping those on tensors, on the model's attributes and on global state. Our
model's switches are attributes (bools, numbers, strings), so a graph of other switches is not reused: that
model traces its own, and the next save keeps both (tests/unit/test_trainer_trace_cache.py). The model must hold
nothing the cache cannot pickle: a torch.dtype (the model keeps act_dtype by name) or a custom op's handle
(Attention.prep is a flag). Our Triton ops are called as
`torch.ops.speedrun.<name>`, never through the object `@torch.library.custom_op` returns: a trace that calls that
object keeps a guard naming it, and its library handle does not pickle ("cannot pickle 'torch._C._DispatchModule'"
at save: seen on an H100 on 2026-12-07 in the GPU case of the trace-cache test; calling such an object inside a
compiled function gives the same on the CPU).

Nor may a parameter carry a .grad while dynamo traces: the guards are pickled then, at compile time, each parameter
with its .grad, and a gradient is not a value the guards keep, so it is written as a missing value and the next
process dies loading it ("assigned grad expected to be a Tensor or None but got grad of type _Missing": seen on an
H100 on 2026-12-07 with CUDA graphs, whose OwnedGradients zeroes every .grad before a step's first forward; the same
on the CPU with the .grads set before the first call). `grads_aside` sets them aside for each compiled call: the
forward neither reads nor writes a .grad, and autograd finds the .grad restored when the backward accumulates.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import traceback

import torch

log = logging.getLogger(__name__)
_APART = False   # _names_apart has run in this process


def enable(device: torch.device) -> None:
    """Record dynamo's traces for the cache, and look there before tracing: process-wide, before torch.compile,
    with the traces of the model's device in a folder of their own."""
    torch._dynamo.config.caching_precompile = True
    _names_apart()
    _folder_per_device(device)


def _folder_per_device(device: torch.device) -> None:
    """dynamo files a trace under its function alone (a hash of its name and first line), and the trace's guards
    hold its tensors' device index. Under torchrun a node's ranks share one cache folder, each on its own GPU: one
    folder would keep whichever rank saved last, and every other rank would fail that trace's guards and trace
    again (one GPU has measured this cache, not eight). So each device keeps its traces apart, in
    <cache folder>/dynamo/<cuda0, cuda1, ..., cpu>."""
    from torch._dynamo import package
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    store = getattr(package, "DynamoCache", None)
    if store is None or not callable(getattr(store, "path_prefix", None)):
        return   # a torch without this store: its own layout, shared by the ranks
    label = device.type + ("" if device.index is None else str(device.index))
    store.path_prefix = lambda: os.path.join(cache_dir(), "dynamo", label)
    if isinstance(getattr(store, "_path_prefix", None), str):   # the folder as set when torch was imported
        store._path_prefix = store.path_prefix()


def _names_apart() -> None:
    """dynamo names the globals a trace installs in the model's module `<prefix>_<n>`, n from a counter that starts
    at 0 in every process. Traces loaded from the cache install theirs under the names their own process gave them,
    so a trace made in this process after a load (a model of other switches, whose guards the loaded one fails) asked
    for `__builtins_dict___0` again and died: "Name '__builtins_dict___0' already exists in scope" (torch 2.13, CPU,
    tests/unit/test_trainer_trace_cache.py). This process's counter starts at a random 48-bit offset instead, once."""
    from torch._dynamo import bytecode_transformation

    global _APART
    if not _APART and hasattr(bytecode_transformation, "_unique_id_counter"):
        bytecode_transformation._unique_id_counter = itertools.count(secrets.randbits(48))
        _APART = True


@contextlib.contextmanager
def loading(cuda_graphs: bool):
    """Around torch.compile, where the cache loads a model's traces (nothing without the cache):

    - the guards' unpickling inside a tracing context of its own. A guard on a module (dynamo's ImportSource: the
      FlexAttention path has one, the dense path none) installs itself again when unpickled, and that needs a
      tracing context, which a load at torch.compile has not: "TracingContext.get() must be called within an
      ongoing trace" (torch 2.11 and 2.13; upstream's fix, pytorch#187736, gives the unpickling a context to throw
      away). torch then retried the load on a package it had already marked loaded, and died on that: the bare
      AssertionError of the H100 (torch 2.11, package.py:614, with CUDA graphs and without, 2026-12-07), on the CPU
      with FlexAttention "CompilePackage is already initialized". What the guards install there is dropped with
      the context; the loaded guards are the pickled ones.
    - guard sources that take their computed fields back: torch 2.11 pickles a source dataclass with every field,
      those its __post_init__ computes too (DefaultsSource's `field` and `_name`, a guard on a function's default
      arguments), and unpickling then called the class with them: "DefaultsSource.__init__() takes from 3 to 4
      positional arguments but 6 were given" (package.py:130; an H100, 2026-12-07 night, after the context above
      let the load get that far). During the unpickling such a class drops them (lenient_sources); torch 2.13 pickles
      the init fields only, which pass unchanged.
    - with CUDA graphs, inductor's global CUDA-graph switch on. The load rebuilds each cached graph's wrapper
      without calling inductor's compiler, and takes that switch from the global config (deserialize_bundled_cache_
      entry in torch 2.11 and 2.13), where torch.compile's reduce-overhead mode sets it only for its own compiles:
      the loaded graphs would run without CUDA graphs."""
    if not enabled():
        yield
        return
    import torch._inductor.config as inductor_config
    from torch import _guards
    from torch._dynamo import package

    unpickle = package.load_guards_state

    def load_guards_state(state):
        with lenient_sources():
            if _guards.TracingContext.try_get() is not None:
                return unpickle(state)
            with _guards.tracing(_guards.TracingContext(None)):
                return unpickle(state)

    package.load_guards_state = load_guards_state
    try:
        with inductor_config.patch({"triton.cudagraphs": True} if cuda_graphs else {}):
            yield
    finally:
        package.load_guards_state = unpickle


@contextlib.contextmanager
def lenient_sources():
    """Every dynamo Source dataclass with fields its __init__ does not take, called with all its fields in order,
    is called with its init fields alone (the others are computed again); restored after."""
    import dataclasses

    from torch._dynamo.source import Source

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    patched = []
    for cls in set(subclasses(Source)):
        fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
        if all(f.init for f in fields) or "__init__" not in cls.__dict__:
            continue
        init = cls.__dict__["__init__"]

        def lenient(self, *args, _init=init, _fields=fields, **kwargs):
            if len(args) == len(_fields) and not kwargs:
                args = tuple(a for a, f in zip(args, _fields) if f.init)
            return _init(self, *args, **kwargs)

        cls.__init__ = lenient
        patched.append((cls, init))
    try:
        yield
    finally:
        for cls, init in patched:
            cls.__init__ = init


def disable(why: Exception) -> None:
    """Off for the rest of this process, with a warning saying why (a cache that failed to load); the cache folder
    stays as it is."""
    torch._dynamo.config.caching_precompile = False
    log.warning("compile_trace_cache: the cached traces did not load (%s); tracing the model instead, and saving "
                "no traces from this process", _described(why))


def enabled() -> bool:
    return bool(torch._dynamo.config.caching_precompile)


def grads_aside(compiled, model: torch.nn.Module):
    """`compiled` called with every parameter's .grad set to None and put back after (see above); `compiled`
    itself without the trace cache."""
    if not enabled():
        return compiled
    params = list(model.parameters())

    def call(*args, **kwargs):
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            return compiled(*args, **kwargs)
        finally:
            for p, g in zip(params, grads):
                p.grad = g

    return call


def save() -> bool:
    """Write this process's traces into the cache folder; whether it wrote. Nothing when the cache is off, or when
    this process traced nothing (every graph came from the cache): it would write what it loaded, and the node
    runner would find the compile cache changed and upload it all again."""
    from torch._dynamo.utils import counters

    if not enabled() or not counters["stats"]["unique_graphs"]:
        return False
    try:
        torch.compiler.save_cache_artifacts()
    except Exception as e:  # noqa: BLE001 - experimental in torch: a cache that cannot be written only costs a trace
        log.warning("compile_trace_cache: traces not saved (%s)", _described(e))
        return False
    return True


def _described(e: BaseException) -> str:
    """'Type: the message's first line (raised at torch/_dynamo/x.py:N)', for a one-line warning, then the same of
    the exception it came from (`raise ... from`) or was raised while handling. The place matters as much as the
    message: torch's loader fails on bare asserts (an H100 on 2026-12-07: "AssertionError: "), and the one that
    matters can be the one before, which torch caught and only logged (a failed install, then the retry's assert)."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (raised at {_in_package(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"
    if e.__cause__ is not None:
        text += f", from {_described(e.__cause__)}"
    elif e.__context__ is not None and not e.__suppress_context__:
        text += f", while handling {_described(e.__context__)}"
    return text


def _in_package(filename: str) -> str:
    """A source file's path from its package on (torch/_dynamo/package.py), not the interpreter's folders."""
    return filename.rsplit("site-packages/", 1)[-1]
