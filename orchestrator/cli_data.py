"""`speedrun data stage|prepare|verify`: FineWeb shards staged from a source, prepared from documents, or checked.

Argument parsing and printing only (orchestrator/cli.py registers these with add_data_commands); the work is
orchestrator/data/'s.
"""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from orchestrator.terminal import OutputConsole, print_json

console = OutputConsole(highlight=False)
err_console = Console(stderr=True, highlight=False)


def add_data_commands(sub) -> None:
    """`speedrun data stage|prepare|verify` (orchestrator/data/)."""
    data = sub.add_parser("data", help="stage, prepare or verify FineWeb shards").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("stage", help="copy shards from a source to a local directory (parallel, verified, resumable)")
    p.add_argument("--source", required=True, help="directory, http(s)://, hf://datasets/..., s3://... or synthetic://...")
    p.add_argument("--dest", required=True, help="node-local directory for the shards")
    p.add_argument("--train-shards", type=int, help="how many train shards (default: all the source has)")
    p.add_argument("--val-shards", type=int, default=1)
    p.set_defaults(func=_data_stage)
    p = data.add_parser("prepare", help="tokenize parquet/jsonl documents into shards (GPT-2 BPE)")
    p.add_argument("--input", nargs="+", required=True, help="parquet or jsonl files, or folders of them")
    p.add_argument("--out", required=True)
    p.add_argument("--encoding-file", help="local r50k_base.tiktoken, or a folder with vocab.bpe + encoder.json")
    p.add_argument("--val-docs", type=int, help="documents for validation (default: enough for 10,485,760 tokens)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--workers", type=int, help="encoding threads (default: all cores)")
    p.add_argument("--text-field", default="text")
    p.set_defaults(func=_data_prepare)
    p = data.add_parser("verify", help="check every shard of a directory (header, size, sha256)")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_data_verify)


def _data_stage(args) -> int:
    from orchestrator.data import stage_shards

    r = stage_shards(args.source, args.dest, args.train_shards, args.val_shards, console=err_console)
    console.print(f"{len(r.train_files)} train + {len(r.val_files)} val shards in {r.dest}: "
                  f"{r.bytes_fetched / 1e6:.1f} MB fetched in {r.seconds:.1f} s")
    if "entropy_rate_nats" in r.info:
        console.print(f"entropy rate of the synthetic data (best possible loss): {r.info['entropy_rate_nats']:.4f} nats/token")
    return 0


def _data_prepare(args) -> int:
    from orchestrator.data import prepare_shards

    r = prepare_shards(args.input, args.out, args.encoding_file, args.val_docs, args.shard_tokens,
                       args.workers, args.text_field)
    console.print(f"{r.documents} documents, {r.tokens} tokens -> {len(r.val_files)} val + "
                  f"{len(r.train_files)} train shards in {r.out} ({r.seconds:.1f} s)")
    return 0


def _data_verify(args) -> int:
    from orchestrator.data import verify_dir

    checks = verify_dir(args.dir)
    if args.json:
        from dataclasses import asdict

        print_json({"dir": str(args.dir), "ok": all(c.ok for c in checks), "shards": [asdict(c) for c in checks]})
        return 0 if all(c.ok for c in checks) else 1
    t = Table(title=f"shards in {args.dir}", title_justify="left")
    for col in ("shard", "tokens", "sha256", "status"):
        t.add_column(col, justify="right" if col == "tokens" else "left")
    for c in checks:
        t.add_row(c.name, f"{c.tokens:,}" if c.tokens is not None else "-", (c.sha256 or "not recorded")[:16],
                  "ok" if c.ok else f"[red]{c.error}[/red]")
    console.print(t)
    return 0 if all(c.ok for c in checks) else 1
