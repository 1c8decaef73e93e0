"""The sink of one ranged part: write at its offset, count it, and keep the file's sha256 running.

A shard arrives as parts in any order; sha256 needs the bytes in order. Bytes that land exactly where the
hashed prefix ends are hashed on the spot, so a file fetched as one stream is never read back; the rest is
read back from the page cache as soon as every part before it is done.
"""
from __future__ import annotations

import hashlib
import os
import threading


class PartWriter:
    """The sink of one part: write at the offset, count for the progress bar, feed the running digest."""

    def __init__(self, fd: int, digest: "InOrderDigest", advance):
        self.fd, self.digest, self.advance = fd, digest, advance
        self.counted = 0

    def restart(self, start: int) -> None:
        if self.counted:
            self.advance(-self.counted)
            self.counted = 0
            self.digest.rewind(start)

    def write(self, offset: int, data) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            self.digest.feed(offset, view[:n])
            offset += n
            view = view[n:]
            self.counted += n
            self.advance(n)

    def copied(self, offset: int, n: int) -> None:
        self.counted += n
        self.advance(n)


class InOrderDigest:
    """sha256 of a file whose parts land out of order. Bytes that arrive right where the hashed prefix
    ends are hashed on the spot (a file fetched in one stream is never read back); the rest is read back
    from the page cache once every part before it is done."""

    def __init__(self, fd: int, parts: list[tuple[int, int, int]], done: set[int]):
        self.fd, self.parts, self.done = fd, parts, set(done)
        self.h = hashlib.sha256()
        self.pos = 0  # bytes hashed so far: always a prefix of the file
        self.lock = threading.Lock()
        self.stale = False  # bytes already hashed were written again: hash the whole file at the end

    def rewind(self, offset: int) -> None:
        with self.lock:
            if self.pos > offset:
                self.stale = True

    def feed(self, offset: int, data) -> None:
        if offset == self.pos and not self.stale:
            with self.lock:
                if offset == self.pos and not self.stale:
                    self.h.update(data)
                    self.pos += len(data)

    def part_done(self, i: int) -> None:
        self.done.add(i)
        if self.lock.acquire(blocking=False):
            try:
                self._catch_up()
            finally:
                self.lock.release()

    def _catch_up(self) -> None:
        for i, start, length in self.parts:
            end = start + length
            if self.pos >= end:
                continue
            if i not in self.done:
                return
            while self.pos < end:
                self.h.update(os.pread(self.fd, min(8 << 20, end - self.pos), self.pos))
                self.pos = min(end, self.pos + (8 << 20))

    def finish(self) -> str:
        with self.lock:
            if self.stale:
                self.h, self.pos, self.stale = hashlib.sha256(), 0, False
            self._catch_up()
        return self.h.hexdigest()
