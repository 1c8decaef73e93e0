"""A secret planted in the environment (and leaked into the training log on purpose) reaches no object in
the store, no manifest, no spool file, no log record and no console output, through an upload that is
throttled, fails, is collected and syncs its log along the way."""
from __future__ import annotations

import io
import json
import logging
import uuid

import pytest
from rich.console import Console
from s3_server import FaultProxy, moto_s3, s3_env  # noqa: F401 (fixtures)

from orchestrator.artifacts import SeedUploader, UploadIncomplete, collect
from orchestrator.log_sync import LogSync
from orchestrator.redaction import safe_environment
from orchestrator.store import StoreError, open_store

pytestmark = pytest.mark.integration

SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAPLANTEDKEY123456",
    "AWS_SECRET_ACCESS_KEY": "Planted/Secret+Key/0123456789abcdefXYZ",  # moto accepts any credentials
    "HF_TOKEN": "hf_plantedTokenValue1234567890abcd",
    "MY_SERVICE_PASSWORD": "hunter2-planted-pw",
}


def test_planted_secrets_reach_no_artifact_and_no_output(moto_s3, s3_env, monkeypatch, tmp_path, caplog, capsys):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    caplog.set_level(logging.DEBUG, logger="orchestrator")
    console_out = io.StringIO()
    console = Console(file=console_out, force_terminal=True, width=200)
    bucket = moto_s3.create_bucket(f"sec-{uuid.uuid4().hex[:8]}")

    seed = tmp_path / "seed"
    (seed / "ckpt").mkdir(parents=True)
    (seed / "env.json").write_text(json.dumps(safe_environment(), indent=1))
    (seed / "ckpt" / "final.pt").write_bytes(b"\0" * 4096)
    log_text = ("step:1/1 val_loss:3.2700 train_time:5ms step_avg:5.00ms\n"
                f"debug: HF_TOKEN={SECRETS['HF_TOKEN']}\n"  # a careless script printing its environment
                f"aws secret is {SECRETS['AWS_SECRET_ACCESS_KEY']} for {SECRETS['AWS_ACCESS_KEY_ID']}\n"
                f"fetching https://svc:{SECRETS['MY_SERVICE_PASSWORD']}@example.invalid/data\n")
    errors = []
    with FaultProxy(moto_s3.port, throttle_first=3) as proxy:
        url = f"s3://{bucket}/p?endpoint_url={proxy.endpoint}"
        store = open_store(url, retry_budget_s=30, max_attempts=1)  # throttling passes through tenacity's logs
        with LogSync(store, seed / "train.log", "sw/seed-0/train.log", every_s=0.05):
            (seed / "train.log").write_text(log_text)
        # An unreachable endpoint: the error messages and warnings must be clean too.
        dead = open_store(f"s3://{bucket}/p?endpoint_url=http://127.0.0.1:9", retry_budget_s=0.5, max_attempts=1)
        with pytest.raises(UploadIncomplete) as e:
            SeedUploader(dead, tmp_path / "spool", console=console).upload_seed(seed, "sw/seed-0", keep_last_ckpt=1)
        errors.append(str(e.value))
        spooled = {p: p.read_bytes() for p in (tmp_path / "spool").rglob("*") if p.is_file()}
        report = collect(store, tmp_path / "spool", "sw", console=console)
        errors.append(report.describe())
        console.print(report.describe())
    assert proxy.throttled == 3 and report.ok and report.completed == ["sw/seed-0"]
    with pytest.raises(StoreError) as e:
        open_store(f"s3://{SECRETS['AWS_ACCESS_KEY_ID']}:{SECRETS['AWS_SECRET_ACCESS_KEY']}@{bucket}/p")
    errors.append(str(e.value))

    client = moto_s3.client()
    objects = {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
               for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert set(objects) == {f"p/sw/seed-0/{k}" for k in ("env.json", "train.log", "ckpt/final.pt", "manifest.json")}
    captured = capsys.readouterr()
    haystacks = {**{f"object {k}": v for k, v in objects.items()}, **{f"spool {p}": v for p, v in spooled.items()},
                 "log records": caplog.text.encode(), "console": console_out.getvalue().encode(),
                 "stdout": captured.out.encode(), "stderr": captured.err.encode(),
                 "errors": "\n".join(errors).encode()}
    assert caplog.text and spooled  # the haystacks are not empty: the search below means something
    for where, data in haystacks.items():
        for name, secret in SECRETS.items():
            assert secret.encode() not in data, f"{name} leaked into {where}"
    env = json.loads(objects["p/sw/seed-0/env.json"])
    assert env["HF_TOKEN"] == env["AWS_SECRET_ACCESS_KEY"] == "<redacted>"
    assert b"step:1/1 val_loss:3.2700" in objects["p/sw/seed-0/train.log"]  # the useful part of the log survives
    assert objects["p/sw/seed-0/train.log"].count(b"<redacted>") == 4
