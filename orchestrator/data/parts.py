"""The sink of one ranged part: write at its offset, count it, and keep the file's sha256 running.

A shard arrives as parts in any order; sha256 needs the bytes in order. Bytes that land exactly where the
hashed prefix ends are hashed on the spot, so a file fetched as one stream is never read back; the rest is
read back from the page cache as soon as every part before it is done.
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
import os
import threading
from concurrent.futures import Future


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


class OrderedPool:
    """Worker threads that always take the waiting task with the lowest key: (shard order, part index).

    Shards therefore complete in order, and a shard queued later never delays one queued earlier, which
    keeps a killed stage's unfinished work small and makes a failure surface before later shards run.
    """

    def __init__(self, workers: int):
        self._heap: list = []
        self._cv = threading.Condition()
        self._closed = False
        self._seq = itertools.count()  # ties keep submission order; futures are never compared
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, key: tuple, fn, *args) -> Future:
        future: Future = Future()
        with self._cv:
            heapq.heappush(self._heap, (key, next(self._seq), future, fn, args))
            self._cv.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if not self._heap:
                    return
                _, _, future, fn, args = heapq.heappop(self._heap)
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:
                    future.set_exception(e)

    def __enter__(self) -> "OrderedPool":
        return self

    def __exit__(self, *exc) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()
