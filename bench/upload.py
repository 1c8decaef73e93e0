"""Upload throughput, in one run: our SeedUploader (snapshot, sha256 of every file, concurrent files,
multipart parts, manifest last) against sequential boto3 `upload_file` calls (boto3's default
TransferConfig, one file after the other), both to moto_server on loopback.

    .venv/bin/python bench/upload.py [--ckpt-mb 200 --ckpts 4 --small 400 --small-kb 500] [--dir /tmp]

About 1 GB by default: four checkpoint-sized files and hundreds of small ones (metrics shards, logs).
moto_server is a slow Python endpoint (~60 MB/s on loopback), so the ratio shows how much of the endpoint
each client uses, not what a real S3 or R2 bucket gives. Prints a rich table and writes
bench/results/upload-<hostname>.json. Everything it creates is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from orchestrator.artifacts import SeedUploader  # noqa: E402
from orchestrator.store import open_store  # noqa: E402
from s3_server import ENV, MotoServer  # noqa: E402


def make_artifacts(root: Path, ckpts: int, ckpt_mb: int, small: int, small_kb: int) -> int:
    (root / "ckpt").mkdir(parents=True)
    for i in range(ckpts):  # random bytes: no layer can compress them
        with open(root / "ckpt" / f"step_{(i + 1) * 500:06d}.pt", "wb") as f:
            for _ in range(ckpt_mb):
                f.write(os.urandom(1 << 20))
    for i in range(small):
        (root / "metrics").mkdir(exist_ok=True)
        (root / "metrics" / f"part-{i:04d}.bin").write_bytes(os.urandom(small_kb * 1024))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def reset_moto(server: MotoServer) -> None:
    """Drop every stored object so moto's memory holds one run at a time."""
    req = urllib.request.Request(f"{server.endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(req, timeout=30).read()


def run_boto3_sequential(server: MotoServer, bucket: str, src: Path) -> float:
    client = server.client()
    files = sorted(p for p in src.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    for p in files:
        client.upload_file(str(p), bucket, f"seq/{p.relative_to(src).as_posix()}")
    return time.perf_counter() - t0


def run_ours(server: MotoServer, bucket: str, src: Path, spool: Path, prefix: str) -> tuple[float, int]:
    store = open_store(f"s3://{bucket}/ours?endpoint_url={server.endpoint}")
    t0 = time.perf_counter()
    manifest = SeedUploader(store, spool).upload_seed(src, prefix)
    return time.perf_counter() - t0, len(manifest.files)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpts", type=int, default=4)
    ap.add_argument("--ckpt-mb", type=int, default=200)
    ap.add_argument("--small", type=int, default=400)
    ap.add_argument("--small-kb", type=int, default=500)
    ap.add_argument("--dir", default=None, help="where the artifacts are written (default: the temp dir)")
    args = ap.parse_args()
    console = Console()
    os.environ.update(ENV)  # moto accepts any credentials; these are dummies
    os.environ.pop("AWS_ENDPOINT_URL", None)

    load_at_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="speedrun-bench-upload-", dir=args.dir))
    rows = []
    try:
        src = work / "seed"
        make_artifacts(src, args.ckpts, args.ckpt_mb, args.small, args.small_kb)
        # The mix a seed uploads, and its small files alone (logs, metrics), where per-request latency rules.
        scenarios = [("checkpoints + small files", src), ("small files only", src / "metrics")]
        with MotoServer() as server:
            for i, (name, d) in enumerate(scenarios):
                files = [p for p in d.rglob("*") if p.is_file()]
                size = sum(p.stat().st_size for p in files)
                reset_moto(server)
                server.create_bucket("bench")
                seq_s = run_boto3_sequential(server, "bench", d)
                reset_moto(server)
                server.create_bucket("bench")
                ours_s, uploaded = run_ours(server, "bench", d, work / "spool", f"bench/seed-{i}")
                assert uploaded == len(files)
                rows.append({"scenario": name, "files": len(files), "bytes": size,
                             "sequential_boto3_s": round(seq_s, 2), "sequential_boto3_MBps": round(size / 1e6 / seq_s, 1),
                             "ours_s": round(ours_s, 2), "ours_MBps": round(size / 1e6 / ours_s, 1),
                             "ratio": round(seq_s / ours_s, 2)})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = Table(title="upload to moto_server on loopback: sequential boto3 upload_file vs SeedUploader")
    for col in ("scenario", "files", "MB", "sequential MB/s", "ours MB/s", "ratio"):
        table.add_column(col, justify="left" if col == "scenario" else "right")
    for r in rows:
        table.add_row(r["scenario"], str(r["files"]), f"{r['bytes'] / 1e6:.0f}", f"{r['sequential_boto3_MBps']:.1f}",
                      f"{r['ours_MBps']:.1f}", f"{r['ratio']:.2f}x")
    console.print(table)
    console.print("ours also hashes every byte (sha256), snapshots into the spool and writes the manifest.")

    import boto3
    import moto

    host = socket.gethostname()
    out = ROOT / "bench" / "results" / f"upload-{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "host": host, "cpus": os.cpu_count(), "loadavg_1min_at_start": round(load_at_start, 2),
        "platform": platform.platform(), "python": platform.python_version(),
        "boto3": boto3.__version__, "moto": moto.__version__, "endpoint": "moto_server on 127.0.0.1",
        "ckpts": args.ckpts, "ckpt_mb": args.ckpt_mb, "small_files": args.small, "small_kb": args.small_kb,
        **{k: v for k, v in rows[0].items() if k != "scenario"},  # the headline: the whole seed
        "scenarios": rows,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2) + "\n")
    console.print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
