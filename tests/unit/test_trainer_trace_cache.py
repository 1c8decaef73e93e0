"""compile_trace_cache (trainer/trace_cache.py): a second process loads dynamo's traces from the cache folder the
first one saved into, instead of tracing the model again, and computes the same loss; a model of other switches in
the same folder traces its own graph. Real torch.compile (inductor on the CPU), one process per compile, as the
node runner starts one per seed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
# One compiled forward and backward of the tiny model with the given switches, then the trace cache saved; prints
# the loss, its gradient's sum, dynamo's cache counters and the seconds it spent tracing Python.
PROGRAM = """
import json, sys, torch
from trainer import trace_cache
from trainer.cuda_graphs import compile_model
from trainer.data import BOS
from trainer.fixtures import randomised_model, tiny_config
from torch._dynamo.utils import compilation_time_metrics, counters

cfg = tiny_config(num_layers=2, cuda_graphs=False, compile_trace_cache=True, **json.loads(sys.argv[1]))
model = randomised_model(cfg)
forward = compile_model(model, cfg)
t = torch.randint(0, BOS, (513,), generator=torch.Generator().manual_seed(3))
t[0] = BOS
loss = forward(t[:-1], t[1:], torch.tensor(2))
loss.backward()
trace_cache.save()
eager = model(t[:-1], t[1:], torch.tensor(2)).item()
print(json.dumps(dict(loss=loss.item(), eager=eager, grad=sum(p.grad.double().sum().item() for p in model.parameters()
                                                             if p.grad is not None),
                      cache=dict(counters["dynamo_cache"]),
                      tracing_s=sum(compilation_time_metrics.get("bytecode_tracing", [])))))
"""


def compiled_run(cache: Path, **switches) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", PROGRAM, json.dumps(switches)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_traces_and_a_model_of_other_switches_traces_its_own(tmp_path):
    cache = tmp_path / "cache"
    first = compiled_run(cache)
    assert first["cache"].get("dynamo_cache_miss") and (cache / "dynamo").is_dir()
    second = compiled_run(cache)
    assert second["cache"].get("dynamo_cache_hit") == 1
    assert second["tracing_s"] < first["tracing_s"] / 4   # it read the model's Python (almost) not at all
    assert (second["loss"], second["grad"]) == (first["loss"], first["grad"])
    assert abs(second["loss"] - second["eager"]) < 1e-4
    # switches the model reads as config values, no new parameter (the logits' soft-cap form), or as a parameter
    # and a step (backout): not the cached graph; each loss is its own eager model's
    for switches in (dict(logit_rescale=True), dict(backout_layer=0)):
        other = compiled_run(cache, **switches)
        assert abs(other["loss"] - other["eager"]) < 1e-4 and abs(other["loss"] - first["loss"]) > 1e-3, switches
