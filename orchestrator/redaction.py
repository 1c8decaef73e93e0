"""Secrets never reach env.json, the store, logs or the console: what is redacted and how.

    redact(text) -> str               # values of secret-named env vars on this machine, key/token/URL-password shapes
    redact_bytes(data) -> bytes       # the same for a file's bytes (non-UTF-8 bytes kept as they were)
    safe_environment(env=None) -> dict[str, str]   # for env.json: secret-named variables show as <redacted>
    handler.addFilter(RedactingFilter())           # no record the handler emits carries a secret
    SECRET_NAME.search(name)          # a variable name that holds a secret (AWS_*, *TOKEN*, *PASSWORD*, ...)
"""
from __future__ import annotations

import logging
import os
import re

SECRET_NAME = re.compile(r"AWS_|TOKEN|SECRET|KEY|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|AUTH|COOKIE|PRIVATE", re.I)
SECRET_PATTERNS = [
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "<redacted>"),  # AWS access key ids
    (re.compile(r"\b(?:hf|gh[pousr]|github_pat|xox[abp]|sk)_[A-Za-z0-9_\-]{16,}"), "<redacted>"),  # HF/GitHub/Slack/API keys
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=\-]{12,}"), r"\1 <redacted>"),
    # NAME=value where NAME ends in a secret word ("tokens=393216" is a count, not a secret: not matched);
    # values of 8+ characters that are not plain numbers.
    (re.compile(r"(?i)(\b[A-Za-z_]*(?:secret|token|password|passwd|api[_-]?key|access[_-]?key|secret[_-]?key)"
                r"[\"']?\s*[=:]\s*[\"']?)(?!\d+\b)[^\s,;'\"]{8,}"), r"\1<redacted>"),
    (re.compile(r"(://)[^/\s:@]+:[^/\s@]+@"), r"\1<redacted>@"),  # user:password@ in URLs
]


def redact(text: str) -> str:
    """`text` with secret values replaced by <redacted>: values of secret-named environment variables
    set on this machine, and anything shaped like a key, token or URL password."""
    values = sorted({v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 8}, key=len, reverse=True)
    for v in values:
        text = text.replace(v, "<redacted>")
    for pattern, repl in SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_bytes(data: bytes) -> bytes:
    # surrogateescape keeps non-UTF-8 bytes as they were
    return redact(data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")


def safe_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment to record in env.json: secret-named variables show as <redacted>, other values
    pass through `redact`."""
    env = dict(os.environ if env is None else env)
    return {k: "<redacted>" if SECRET_NAME.search(k) else redact(v) for k, v in sorted(env.items())}


class RedactingFilter(logging.Filter):
    """Attach to a logging handler so no record it emits carries a secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True
