"""Secrets never reach env.json, logs or the console: what redact and safe_environment remove."""
from __future__ import annotations

import json
import logging

from orchestrator.redaction import RedactingFilter, redact, safe_environment


def test_values_of_secret_variables_are_redacted_wherever_they_appear(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "hunter2-planted")
    monkeypatch.setenv("SHORT_TOKEN", "abc")  # too short to redact blindly: "abc" appears in ordinary text
    out = redact("login with hunter2-planted then abc")
    assert "hunter2-planted" not in out and out.endswith("then abc")


def test_secret_shapes_are_redacted():
    text = ("key AKIAABCDEFGHIJKLMNOP hf_abcdefghijklmnopqrstuvwxyz12 Authorization: Bearer eyJhbGciOiJIUzI1.x.y "
            "https://alice:s3cr3tpw@host/x aws_secret_access_key=wJalrXUtnFEMI/K7MDENG password: pa55word!xyz")
    out = redact(text)
    for secret in ("AKIAABCDEFGHIJKLMNOP", "hf_abcdefghijklmnopqrstuvwxyz12", "eyJhbGciOiJIUzI1", "s3cr3tpw",
                   "wJalrXUtnFEMI", "pa55word"):
        assert secret not in out, secret
    assert "https://<redacted>@host/x" in out and "aws_secret_access_key=<redacted>" in out


def test_ordinary_log_lines_pass_unchanged():
    line = "step:1695/1695 val_loss:3.2772 train_time:168938ms step_avg:99.67ms tokens=393216 key_layers=12"
    assert redact(line) == line


def test_safe_environment_hides_secret_names_and_keeps_the_rest():
    env = {"AWS_ACCESS_KEY_ID": "AKIAABCDEFGHIJKLMNOP", "AWS_SECRET_ACCESS_KEY": "x" * 40, "HF_TOKEN": "hf_" + "a" * 30,
           "WANDB_API_KEY": "k" * 40, "DB_PASSWORD": "pw123456", "GITHUB_AUTH": "z" * 20, "PATH": "/usr/bin",
           "CUDA_VISIBLE_DEVICES": "0,1", "PROXY": "http://bob:pw-in-url@proxy:3128"}
    safe = safe_environment(env)
    assert safe["PATH"] == "/usr/bin" and safe["CUDA_VISIBLE_DEVICES"] == "0,1"
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "WANDB_API_KEY", "DB_PASSWORD", "GITHUB_AUTH"):
        assert safe[k] == "<redacted>"
    assert safe["PROXY"] == "http://<redacted>@proxy:3128"
    dumped = json.dumps(safe)
    assert all(v not in dumped for k, v in env.items() if k not in ("PATH", "CUDA_VISIBLE_DEVICES"))


def test_logging_filter_redacts_formatted_records(monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", "hf_planted_value_1234567890")
    logger = logging.getLogger("test.redact")
    handler = caplog.handler
    handler.addFilter(RedactingFilter())
    try:
        with caplog.at_level(logging.INFO, logger="test.redact"):
            logger.info("token is %s", "hf_planted_value_1234567890")
    finally:
        handler.removeFilter(handler.filters[-1])
    assert "hf_planted" not in caplog.text and "<redacted>" in caplog.text
