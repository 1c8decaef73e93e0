"""A seed's growing train.log reaches the store while it trains, so a node that dies mid-run still leaves it.

    with LogSync(store, local_dir / "train.log", f"{prefix}/train.log", every_s=30.0):
        ...  # run the seed; the growing log is uploaded every every_s seconds and once more at exit

Each upload passes through `redact_bytes`; an unchanged file (same size and mtime) is not sent again.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from orchestrator.redaction import redact_bytes
from orchestrator.store import Store, StoreError, validate_key

log = logging.getLogger(__name__)


class LogSync:
    """Upload a growing file to `key` every `every_s` seconds from a background thread, and once more on
    stop, so a node that dies mid-run still leaves its log. Upload errors are logged, never raised."""

    def __init__(self, store: Store, local_path: str | os.PathLike, key: str, every_s: float = 30.0):
        self.store, self.path, self.key, self.every_s = store, Path(local_path), validate_key(key), every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: tuple[int, int] | None = None
        self.uploads = 0

    def sync_once(self) -> bool:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        if (st.st_size, st.st_mtime_ns) == self._last:
            return False
        try:
            self.store.put_bytes(redact_bytes(self.path.read_bytes()), self.key)
        except (StoreError, OSError) as e:
            log.warning("log sync of %s: %s", self.path, e)
            return False
        self._last = (st.st_size, st.st_mtime_ns)
        self.uploads += 1
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sync_once()

    def start(self) -> "LogSync":
        self._thread = threading.Thread(target=self._loop, name=f"log-sync {self.key}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sync_once()

    def __enter__(self) -> "LogSync":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
