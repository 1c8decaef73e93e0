"""The warm-up's compile-cache record: a second process compiling the same graph finds it in the cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROGRAM = """
import json, torch
from trainer.startup import compile_cache_counts, compile_phases
f = torch.compile(lambda x: (x * 2).sin().sum(), dynamic=False)
f(torch.randn(64, requires_grad=True)).backward()
print(json.dumps([compile_cache_counts(), compile_phases()]))
"""


def test_a_second_process_compiles_nothing_the_first_one_cached(tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), TRITON_CACHE_DIR=str(tmp_path / "triton"),
               PYTHONPATH=str(REPO))

    def one_process() -> list[dict]:
        out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    (first, first_time), (second, second_time) = one_process(), one_process()
    assert first.get("fxgraph_cache_miss", 0) >= 1 and first.get("unique_graphs") == 1
    assert second.get("fxgraph_cache_hit", 0) >= 1 and "fxgraph_cache_miss" not in second
    assert second.get("autograd_cache_hit", 0) >= 1 and "autograd_cache_miss" not in second
    # where the compile time went: the backend's time inside dynamo's; only the second loaded from the cache
    for phases in (first_time, second_time):
        assert 0 < phases["backend_s"] <= phases["dynamo_s"] and phases["tracing_s"] <= phases["dynamo_s"]
    assert "cache_load_s" not in first_time and second_time["cache_load_s"] <= second_time["backend_s"]


def test_startup_parts_split_torchrun_from_the_imports():
    """The warm-up line says what came before it: torchrun's start (from the time the node runner started it, in
    the environment it passes) and the imports; without the node runner, only the imports."""
    from trainer.startup import SEED_STARTED_ENV, startup_parts

    assert startup_parts(100.0, 103.5, {SEED_STARTED_ENV: "97.25"}) == {"torchrun_s": 2.75, "imports_s": 3.5}
    assert startup_parts(100.0, 103.5, {}) == {"imports_s": 3.5}
    assert startup_parts(100.0, 103.5, {SEED_STARTED_ENV: "soon"}) == {"imports_s": 3.5}
