"""A real HTTP file server on 127.0.0.1 for the data tests: byte ranges, injected faults, and a fake HF hub.

`ShardServer(root)` serves files under `root` with HEAD, GET and single `Range: bytes=a-b` requests
(206 answers, Accept-Ranges), the way nginx or a CDN does. Faults are set per file name:
`corrupt` (flip a byte of every answer, or only the first `times`), `truncate` (close the connection
half-way), `delay` (seconds slept per 64 KiB, to keep a transfer in flight), `no_ranges`, `gone` (404 on GET only).
With `hub=True` it also answers the Hugging Face hub's `/datasets/<repo>/resolve/<rev>/<file>` URLs
like the hub does: a 302 to a CDN path on another host name (localhost) carrying X-Linked-Size and X-Linked-Etag (the sha256); files
come from `root/<repo>/<file>`. Every request is logged in `server.requests`.
"""
from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

RESOLVE_RE = re.compile(r"^/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


@dataclass
class Fault:
    corrupt: bool = False
    truncate: bool = False
    times: int | None = None  # how many answers the fault hits; None = all
    delay: float = 0.0
    no_ranges: bool = False
    gone: bool = False  # HEAD still answers, GET says 404: removed from the mirror mid-stage

    def fire(self) -> bool:
        if self.times is None:
            return True
        if self.times > 0:
            self.times -= 1
            return True
        return False


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    authorization: str | None
    bytes_sent: int = 0


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        owner: ShardServer = self.server.owner
        path = unquote(urlsplit(self.path).path)
        entry = Logged(self.command, path, self.headers.get("Range"), self.headers.get("Authorization"))
        with owner.lock:
            owner.requests.append(entry)
        m = RESOLVE_RE.match(path) if owner.hub else None
        if m:
            return self._resolve(m.group(1), m.group(3))
        if path.startswith("/cdn/"):
            path = path[len("/cdn"):]
        file = (owner.root / path.lstrip("/")).resolve()
        if owner.root not in file.parents or not file.is_file():
            return self._answer(404, b"not found\n", body)
        if body and owner.faults.get(file.name, Fault()).gone:
            return self._answer(404, b"gone\n", body)
        self._send_file(file, body, entry)

    def _resolve(self, repo: str, name: str) -> None:
        file = self.server.owner.root / repo / name
        if not file.is_file():
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(302)
        # another host name for the same loopback server, as the hub hands off to a CDN host
        self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/cdn/{repo}/{name}")
        self.send_header("X-Linked-Size", str(file.stat().st_size))
        self.send_header("X-Linked-Etag", f'"{self.server.owner.sha256(file)}"')
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("ETag", '"not-the-sha"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _answer(self, code: int, payload: bytes, body: bool) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _send_file(self, file: Path, body: bool, entry: Logged) -> None:
        owner: ShardServer = self.server.owner
        fault = owner.faults.get(file.name, Fault())
        size = file.stat().st_size
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        ranged = bool(rng) and not fault.no_ranges
        if ranged:
            m = re.match(r"^bytes=(\d+)-(\d*)$", rng.strip())
            if not m or int(m.group(1)) >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = int(m.group(1)), min(int(m.group(2) or size - 1), size - 1)
        self.send_response(206 if ranged else 200)
        if not fault.no_ranges:
            self.send_header("Accept-Ranges", "bytes")
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if not body:
            return
        corrupt = fault.corrupt and body and fault.fire()
        truncate = fault.truncate and not corrupt and fault.fire()
        stop = start + (end - start + 1) // 2 if truncate else end + 1
        with open(file, "rb") as f:
            f.seek(start)
            pos = start
            while pos < stop:
                if fault.delay:  # before the block, so that even a one-block answer takes this long
                    time.sleep(fault.delay)
                block = bytearray(f.read(min(1 << 16, stop - pos)))
                if corrupt and pos == start:
                    block[len(block) // 2] ^= 0xFF
                try:
                    self.wfile.write(block)
                except (BrokenPipeError, ConnectionResetError):
                    return
                pos += len(block)
                entry.bytes_sent += len(block)
        if truncate:
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "ShardServer"


@dataclass
class ShardServer:
    root: Path
    hub: bool = False
    faults: dict[str, Fault] = field(default_factory=dict)
    requests: list[Logged] = field(default_factory=list)

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        self.lock = threading.Lock()
        self._digests: dict[Path, str] = {}
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def sha256(self, file: Path) -> str:
        if file not in self._digests:
            self._digests[file] = hashlib.sha256(file.read_bytes()).hexdigest()
        return self._digests[file]

    def bytes_served(self, name: str | None = None) -> int:
        with self.lock:
            return sum(r.bytes_sent for r in self.requests if name is None or r.path.endswith("/" + name))

    def start(self) -> "ShardServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "ShardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
