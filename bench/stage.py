"""Staging throughput, all in one run: our stager (HTTP from nginx on loopback, and from a directory) against
one sequential `requests` stream and against `cp`, next to the disk's own sequential write speed (dd with
fdatasync) measured in the same run. Every writer ends with its data on disk (fsync / sync), like the stager.

    .venv/bin/python bench/stage.py [--gb 2] [--dir /tmp] [--repeat 2]

Prints a rich table and writes bench/results/stage-<hostname>.json. Goal: >= 80% of the disk's write speed
and >= 2x the sequential download. On loopback one stream is already near the disk's speed, so the download
comparison is also run through nginx's per-connection cap (limit_rate), the way a remote mirror behaves.
Everything it creates is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from orchestrator.data import stage_shards  # noqa: E402
from orchestrator.data.shards import encode_header, shard_name  # noqa: E402

SHARD_TOKENS = 100_000_000  # a real train shard: ~200 MB
NGINX_CONF = """
daemon off;
user root;
worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        # a remote mirror or CDN: each connection capped, as over a WAN
        location /capped/ {{
            alias {root}/;
            limit_rate {cap};
        }}
    }}
}}
"""


def make_shards(folder: Path, n: int) -> int:
    """n train shards of random tokens (content does not matter for throughput)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    block = rng.integers(0, 50257, SHARD_TOKENS, dtype=np.uint16).tobytes()
    for i in range(1, n + 1):
        with open(folder / shard_name("train", i), "wb") as f:
            f.write(encode_header(SHARD_TOKENS))
            f.write(block)
    with open(folder / shard_name("val", 0), "wb") as f:
        f.write(encode_header(SHARD_TOKENS // 10))
        f.write(block[: SHARD_TOKENS // 5])
    return sum(p.stat().st_size for p in folder.iterdir())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(prefix: Path, root: Path, cap_mb: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, root=root, cap=f"{cap_mb}m"))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(prefix)], stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(100):
        try:
            requests.head(url + shard_name("val", 0), timeout=1).raise_for_status()
            return proc, url
        except requests.RequestException:
            if proc.poll() is not None:
                raise SystemExit(f"nginx did not start: {proc.stderr.read().decode()[-500:]}")
            time.sleep(0.1)
    raise SystemExit("nginx did not answer within 10 s")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def dd_write(dest: Path, nbytes: int) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dd", "if=/dev/zero", f"of={dest / 'dd.bin'}", "bs=16M", f"count={nbytes // (16 << 20)}",
                    "conv=fdatasync", "status=none"], check=True)


def cp_all(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p) for p in src.iterdir())
    subprocess.run(["cp", *files, str(dest)], check=True)
    subprocess.run(["sync", "-f", str(dest)], check=True)


def sequential_download(url: str, names: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with requests.Session() as s:
        for name in names:
            with s.get(url + name, stream=True) as r, open(dest / name, "wb") as f:
                r.raise_for_status()
                for block in r.iter_content(1 << 20):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="how much to stage (default 2 GB)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where source and destinations live")
    ap.add_argument("--repeat", type=int, default=2, help="runs per method; the best is reported")
    ap.add_argument("--cap-mb", type=int, default=100, help="per-connection cap (MB/s) of the 'remote mirror' runs")
    args = ap.parse_args()
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="speedrun-bench-stage-", dir=args.dir))
    nginx = None
    try:
        n = max(1, round(args.gb * 1e9 / (2 * SHARD_TOKENS)) - 1)
        total = make_shards(work / "src", n)
        names = sorted(p.name for p in (work / "src").iterdir())
        (work / "nginx").mkdir()
        nginx, url = start_nginx(work / "nginx", work / "src", args.cap_mb)
        capped = url + "capped/"
        cap = f"{args.cap_mb} MB/s per connection"
        console.print(f"{len(names)} shards, {total / 1e9:.2f} GB in {work}; nginx at {url}")

        methods = {
            "disk: dd conv=fdatasync": lambda d: dd_write(d, total),
            "cp + sync (directory)": lambda d: cp_all(work / "src", d),
            "requests, one stream (HTTP)": lambda d: sequential_download(url, names, d),
            "stage_shards (directory)": lambda d: stage_shards(str(work / "src"), d, train_shards=n, progress=False),
            "stage_shards (HTTP, nginx)": lambda d: stage_shards(url, d, train_shards=n, progress=False),
            f"requests, one stream (HTTP, {cap})": lambda d: sequential_download(capped, names, d),
            f"stage_shards (HTTP, {cap})": lambda d: stage_shards(capped, d, train_shards=n, progress=False),
        }
        seconds: dict[str, list[float]] = {m: [] for m in methods}
        noop: list[float] = []
        for rep in range(args.repeat):
            for m, fn in methods.items():
                dest = work / f"dest-{rep}-{len(seconds[m])}"
                subprocess.run(["sync"], check=True)
                seconds[m].append(timed(lambda: fn(dest)))
                if m == "stage_shards (directory)":  # the node runner's common case: everything already there
                    noop.append(timed(lambda: fn(dest)))
                shutil.rmtree(dest)
                console.print(f"  {m}: {total / seconds[m][-1] / 1e9:.2f} GB/s")
        best = {m: min(s) for m, s in seconds.items()}
        gbps = {m: total / s / 1e9 for m, s in best.items()}
        disk = gbps["disk: dd conv=fdatasync"]
        seq = gbps["requests, one stream (HTTP)"]
        table = Table(title=f"staging {total / 1e9:.2f} GB on {platform.node()} (best of {args.repeat})")
        for col in ("method", "seconds", "GB/s", "of disk write", "vs one stream"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for m in methods:
            table.add_row(m, f"{best[m]:.2f}", f"{gbps[m]:.2f}", f"{gbps[m] / disk:.0%}", f"{gbps[m] / seq:.2f}x")
        console.print(table)
        console.print(f"staging the same {total / 1e9:.2f} GB again (already staged, verified): {min(noop):.3f} s")
        ours_http, ours_dir = gbps["stage_shards (HTTP, nginx)"], gbps["stage_shards (directory)"]
        capped_ratio = gbps[f"stage_shards (HTTP, {cap})"] / gbps[f"requests, one stream (HTTP, {cap})"]
        fs = subprocess.run(["df", "--output=source,fstype", str(work)], capture_output=True, text=True).stdout
        result = {
            "host": platform.node(), "cpus": os.cpu_count(), "filesystem": " ".join(fs.split()[2:]),
            "bytes": total, "shards": len(names), "repeat": args.repeat, "seconds": seconds, "best_gb_per_s": gbps,
            "http_of_disk": ours_http / disk, "dir_of_disk": ours_dir / disk, "http_vs_sequential": ours_http / seq,
            "disk_vs_sequential": disk / seq, "noop_restage_seconds": noop, "capped_http_vs_sequential": capped_ratio,
            "goal_met": {"http >= 80% of disk": ours_http >= 0.8 * disk, "dir >= 80% of disk": ours_dir >= 0.8 * disk,
                         "no-op restage < 1 s": min(noop) < 1.0,
                         "http >= 2x sequential (loopback)": ours_http >= 2 * seq,
                         f"http >= 2x sequential ({cap})": capped_ratio >= 2},
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        out = ROOT / "bench" / "results" / f"stage-{platform.node()}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"goals: {result['goal_met']}\nwrote {out}")
    finally:
        if nginx is not None:
            os.kill(nginx.pid, signal.SIGQUIT)
            nginx.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
