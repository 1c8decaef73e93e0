"""Object storage behind one interface: Store, the local-directory store (the default), keys, errors and
`open_store`, which also opens S3 (AWS, R2, MinIO, any endpoint: `store_s3.py`, imported only for s3:// URLs).

    store = open_store("runs")                                   # a directory, or file:///abs/runs
    store = open_store("s3://bucket/prefix")                     # AWS; endpoint from AWS_ENDPOINT_URL
    store = open_store("s3://bucket/prefix?endpoint_url=http://127.0.0.1:9000")

Keys are '/'-separated names relative to the store root, checked by `validate_key`. Every write is atomic:
a reader sees the old object or the new one, never a partial file (temp + rename locally; S3 PUT and
completed multipart uploads are atomic by themselves). S3 credentials come ONLY from boto3's usual chain
(environment, ~/.aws, instance role); a store URL carrying credentials is refused.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

PARTIAL_SUFFIX = ".speedrun-partial"  # local temp files; never a valid key, never listed
CHUNK = 1 << 20


class StoreError(Exception):
    """One sentence naming the object or URL, the cause and the fix."""


class InvalidKey(StoreError, ValueError):
    pass


def validate_key(key: str) -> str:
    """Return `key` if it is a safe object name, else raise InvalidKey saying why."""

    def bad(why: str) -> InvalidKey:
        return InvalidKey(f"object key {key!r}: {why}; use '/'-separated names like 'sweep/seed-0/train.log'")

    if not isinstance(key, str) or not key:
        raise bad("is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise bad("contains control characters")
    if key.startswith("/") or (len(key) > 1 and key[1] == ":"):
        raise bad("is an absolute path")
    if "\\" in key:
        raise bad("contains a backslash")
    parts = key.split("/")
    if any(p == "" for p in parts):
        raise bad("has an empty path segment ('//' or a trailing '/')")
    if any(p in (".", "..") for p in parts):
        raise bad("contains a '.' or '..' segment")
    if key.endswith(PARTIAL_SUFFIX):
        raise bad(f"ends with the reserved suffix {PARTIAL_SUFFIX}")
    if len(key.encode()) > 1024:
        raise bad("is longer than 1024 bytes")
    return key


def _prefix(prefix: str) -> str:
    """A listing prefix: '' (everything) or a valid key, optionally ending in '/'."""
    if prefix in ("", "/"):
        return ""
    stripped = prefix[:-1] if prefix.endswith("/") else prefix
    validate_key(stripped)
    return prefix


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None = None  # as recorded by the writer (S3 metadata); None when not known cheaply
    modified: float | None = None  # unix time of the last write, where stat and list give it


class Store(ABC):
    """Keys are relative to the store root (the S3 prefix or the directory)."""

    root_url: str

    @abstractmethod
    def put_file(self, local_path: str | os.PathLike, key: str, sha256: str | None = None) -> ObjectInfo: ...

    @abstractmethod
    def put_bytes(self, data: bytes, key: str) -> ObjectInfo: ...

    @abstractmethod
    def put_new(self, data: bytes, key: str) -> bool:
        """Create the object only if no object has that key; False (nothing written) if one has."""

    @abstractmethod
    def get_file(self, key: str, local_path: str | os.PathLike) -> Path: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo | None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with `prefix` (string prefix, as S3 does), sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool:
        return self.stat(key) is not None

    def size(self, key: str) -> int | None:
        info = self.stat(key)
        return info.size if info else None

    def sha256(self, key: str) -> str | None:
        """The object's sha256: recorded metadata when present, else computed by reading it back."""
        info = self.stat(key)
        if info is None:
            return None
        if info.sha256:
            return info.sha256
        return hashlib.sha256(self.get_bytes(key)).hexdigest()

    def abort_partial(self, prefix: str = "") -> int:
        """Remove invisible leftovers of interrupted writes under `prefix`; returns how many."""
        return 0

    def url(self, key: str = "") -> str:
        return f"{self.root_url}/{validate_key(key)}" if key else self.root_url


# ------------------------------------------------------------------------------------------ local


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        self.root_url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _atomic_write(self, dest: Path, write) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)  # atomic on POSIX: readers see old or new, never half
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_file(self, local_path, key, sha256=None):
        dest = self._path(key)
        try:
            with open(local_path, "rb") as src:
                self._atomic_write(dest, lambda f: shutil.copyfileobj(src, f, CHUNK))
        except OSError as e:
            raise StoreError(f"{self.url(key)}: cannot write from {local_path}: {e.strerror or e}") from e
        return ObjectInfo(key, dest.stat().st_size, sha256)

    def put_bytes(self, data, key):
        dest = self._path(key)
        try:
            self._atomic_write(dest, lambda f: f.write(data))
        except OSError as e:
            raise StoreError(f"{self.url(key)}: cannot write: {e.strerror or e}") from e
        return ObjectInfo(key, len(data), hashlib.sha256(data).hexdigest())

    def put_new(self, data, key):
        dest = self._path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
            tmp.write_bytes(data)
            try:
                os.link(tmp, dest)  # atomic, and fails if dest exists: one creator wins
                return True
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as e:
            raise StoreError(f"{self.url(key)}: cannot write: {e.strerror or e}") from e

    def get_file(self, key, local_path):
        src, dest = self._path(key), Path(local_path)
        if not src.is_file():
            raise StoreError(f"{self.url(key)}: no such object")
        with open(src, "rb") as f:
            self._atomic_write(dest, lambda out: shutil.copyfileobj(f, out, CHUNK))
        return dest

    def get_bytes(self, key):
        p = self._path(key)
        if not p.is_file():
            raise StoreError(f"{self.url(key)}: no such object")
        return p.read_bytes()

    def stat(self, key):
        p = self._path(key)
        return self._info(key, p) if p.is_file() else None

    @staticmethod
    def _info(key: str, path: Path) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo(key, st.st_size, modified=st.st_mtime)

    def sha256(self, key):
        p = self._path(key)
        return sha256_file(p) if p.is_file() else None

    def _walk(self, prefix: str):
        # Start at the deepest directory the prefix names, so listing one seed does not walk the store.
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not start.is_dir():
            return
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key, path

    def list(self, prefix=""):
        prefix = _prefix(prefix)
        out = [self._info(k, p) for k, p in self._walk(prefix) if not k.endswith(PARTIAL_SUFFIX)]
        return sorted(out, key=lambda o: o.key)

    def delete(self, key):
        p = self._path(key)
        p.unlink(missing_ok=True)
        # Drop directories left empty, up to (not including) the root, so listings stay tidy.
        for parent in p.parents:
            if parent == self.root or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()

    def abort_partial(self, prefix=""):
        n = 0
        for k, p in self._walk(_prefix(prefix)):
            if k.endswith(PARTIAL_SUFFIX):
                p.unlink(missing_ok=True)
                n += 1
        return n


# --------------------------------------------------------------------------------------------- url


def open_store(url: str | os.PathLike, **options) -> Store:
    """A plain path or file:///abs is a LocalStore; s3://bucket/prefix[?endpoint_url=...] an S3Store.

    `options` go to S3Store (retry_budget_s, max_concurrency, ...); a local store takes none.
    """
    text = os.fspath(url)
    if any(ord(c) < 32 for c in text):
        raise StoreError(f"store {text!r}: contains control characters; remove them")
    if "://" not in text:
        return LocalStore(text)
    parts = urlsplit(text)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StoreError(f"store {text!r}: file URLs must be file:///absolute/path")
        return LocalStore(unquote(parts.path))
    if parts.scheme == "s3":
        if "@" in text.split("?", 1)[0]:  # user:secret@bucket, even when the secret holds a '/'
            # The URL is not echoed: it carries the secret.
            raise StoreError("store s3://...@...: credentials in a store URL are refused; "
                             "set them in the environment or ~/.aws where boto3 finds them")
        if not parts.netloc:
            raise StoreError(f"store {text!r}: names no bucket; use s3://bucket/prefix")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}", parts.netloc):
            raise StoreError(f"store {text!r}: {parts.netloc!r} is not a bucket name (letters, digits, '.', '-')")
        prefix = parts.path.strip("/")
        if prefix:
            validate_key(prefix)
        query = parse_qs(parts.query)
        unknown = set(query) - {"endpoint_url", "region"}
        if unknown:
            raise StoreError(f"store {text!r}: unknown option {sorted(unknown)[0]!r}; only endpoint_url and region are read")
        from orchestrator.store_s3 import S3Store  # loaded here: only s3:// stores need the S3 code

        return S3Store(
            parts.netloc,
            prefix,
            endpoint_url=(query.get("endpoint_url") or [None])[0] or os.environ.get("AWS_ENDPOINT_URL") or None,
            region=(query.get("region") or [None])[0],
            **options,
        )
    raise StoreError(f"store {text!r}: unknown scheme {parts.scheme!r}; use a directory, file:///path or s3://bucket/prefix")
