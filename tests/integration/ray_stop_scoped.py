"""`ray stop` for ONE test cluster: what the on-prem test's head runs when the launcher says `ray stop`.

The real `ray stop` ends every Ray process of the machine by name, and other tests run Ray heads on this
machine at the same time. This stops the processes that name the test cluster's temp dir (raylet, GCS,
dashboard, monitor: `ray start --temp-dir=DIR`) and every process under them (workers, job drivers),
sparing only itself: the autostop watcher, a process under the raylet, runs it as its child.
    python ray_stop_scoped.py TEMP_DIR
"""
from __future__ import annotations

import os
import sys

import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)
import psutil  # noqa: E402


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    spared = {os.getpid()}
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid in spared or temp_dir not in " ".join(p.info["cmdline"] or []):
            continue
        found[p.pid] = p
        try:
            found.update({c.pid: c for c in p.children(recursive=True) if c.pid not in spared})
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def main(temp_dir: str) -> int:
    procs = cluster_processes(temp_dir)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    print(f"stopped {len(procs)} process(es) of the Ray cluster in {temp_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
