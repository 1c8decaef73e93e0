"""`python -m trainer --data-dir D --out-dir O [--seed N] [--config F.json] [--set K=V ...] [--resume auto|PATH]`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import typing

MAIN_STARTED = time.time()   # before torch: what the imports cost is measured from here

from trainer.config import TrainConfig  # noqa: E402

USAGE_ERROR = 2


def parse_value(key: str, text: str):
    """Coerce a --set value to the TrainConfig field's type."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if key not in fields:
        raise ValueError(f"--set {key}: unknown TrainConfig key; see trainer/config.py")
    kind = typing.get_type_hints(TrainConfig)[key]
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--set {key}={text}: must be true or false")
        return text.lower() in ("true", "1")
    try:
        return kind(float(text)) if kind is int and "e" in text.lower() else kind(text)
    except ValueError:
        raise ValueError(f"--set {key}={text}: must be {kind.__name__}") from None


def build_config(args) -> TrainConfig:
    overrides: dict = {}
    if args.config:
        try:
            with open(args.config) as f:
                overrides = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--config {args.config}: cannot read a JSON object ({e}); pass the job's trainer: section as JSON") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"--config {args.config}: must hold a JSON object of TrainConfig keys")
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item}: expected KEY=VALUE, e.g. --set steps=50")
        overrides[key.strip()] = parse_value(key.strip(), text.strip())
    if args.seed is not None:
        overrides["seed"] = args.seed
    try:
        return TrainConfig.from_dict(overrides)
    except (ValueError, TypeError) as e:
        where = args.config or "--set"
        raise ValueError(f"{where}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer", description="Train the speedrun GPT (run under torchrun).")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--config", default=None, help="JSON object of TrainConfig overrides")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", default=None, help="auto (newest checkpoint in OUT/ckpt) or a checkpoint path")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        cfg = build_config(args)
    except ValueError as e:
        logging.getLogger("trainer").error("%s", e)
        return USAGE_ERROR

    from trainer.data import ShardError   # torch is imported only once the arguments are known to be good
    from trainer.startup import startup_parts
    from trainer.train import Trainer

    try:
        trainer = Trainer(cfg, args.data_dir, args.out_dir, startup=startup_parts(MAIN_STARTED, time.time()))
        code = trainer.run(resume=args.resume)
    except (ShardError, FileNotFoundError, ValueError) as e:   # bad data, checkpoint path or rank count
        logging.getLogger("trainer").error("%s", e)
        code = 1
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
