"""A real S3 HTTP endpoint on loopback for the tests and bench/upload.py: `moto_server` as a subprocess.

    with MotoServer() as s3:            # or the `moto_s3` pytest fixture
        s3.create_bucket("runs")
        store = open_store(f"s3://runs/x?endpoint_url={s3.endpoint}")
        s3.kill(); s3.start()            # same port again; moto keeps objects in memory, so buckets are gone

Stopped by the PID started here, never by name. Moto accepts any credentials: `s3.env` holds dummy ones.
"""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_binary() -> str:
    return str(Path(sys.executable).with_name("moto_server"))


class MotoServer:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="moto-", suffix=".log")[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return dict(ENV)

    def start(self, timeout_s: float = 30.0) -> "MotoServer":
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([moto_binary(), "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint} within {timeout_s}s")

    def kill(self) -> None:
        """SIGKILL, as a crashed endpoint: no graceful close of open connections."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def __enter__(self) -> "MotoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
        self.log_path.unlink(missing_ok=True)


SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    """A loopback HTTP proxy in front of an S3 endpoint that misbehaves on purpose:

    - answers `503 SlowDown` to the first `throttle_first` requests (or to all, with throttle_first=-1);
    - with `hold_after_parts=K`, blocks every request once K multipart parts went through, until
      `release()`: the test then knows the upload is stuck in the middle, deterministically;
    - drops the client connection without an answer when the upstream is down, as a dead endpoint does.
    """

    def __init__(self, upstream_port: int, throttle_first: int = 0, hold_after_parts: int | None = None):
        self.upstream_port, self.throttle_first, self.hold_after_parts = upstream_port, throttle_first, hold_after_parts
        self.requests = self.throttled = self.parts = self.held = 0
        self.released = threading.Event()
        self.holding = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and Expect: 100-continue, as botocore uses them

            def log_message(self, *args):
                pass

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    proxy.requests += 1
                    throttle = proxy.throttle_first < 0 or proxy.throttled < proxy.throttle_first
                    if throttle:
                        proxy.throttled += 1
                    hold = proxy.hold_after_parts is not None and proxy.parts >= proxy.hold_after_parts
                    if not throttle and not hold and "partNumber=" in self.path:
                        proxy.parts += 1
                if throttle:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                if hold:
                    with proxy._lock:
                        proxy.held += 1
                    proxy.holding.set()
                    proxy.released.wait()
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    conn.close()
                except OSError:
                    self.close_connection = True  # upstream gone: the client sees a dropped connection
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(k, v)
                # HEAD answers carry the object's length with no body
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # clients that drop connections mid-request are part of the test

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release(self) -> None:
        self.released.set()

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3_env(monkeypatch):
    """Dummy credentials in boto3's usual chain; no real AWS config can leak into a test."""
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


@pytest.fixture(scope="module")
def moto_s3():
    pytest.importorskip("moto")
    if not Path(moto_binary()).exists():
        pytest.skip("moto_server is not installed next to this python; install the [dev] extra")
    with MotoServer() as server:
        yield server
