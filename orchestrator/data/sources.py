"""Where shards come from: a directory, an http(s) mirror, the Hugging Face hub, S3, or the synthetic generator.

Every source answers three questions the stager asks: which shards exist (`available`), how big each is
and what its sha256 is when the source knows it (`describe`), and "hand bytes [start, start+length) of
this shard to this sink at their offsets" (`fetch_range`), so ranged parts of one file can be
fetched in parallel. Sources that cannot answer ranges set `ranged = False`.
A source may publish a `SHA256SUMS` file (`sha256sum` format) next to its shards; it is then the index
(names) and the expected digests.
"""
from __future__ import annotations

import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import urlsplit

from orchestrator.data.shards import DataError, parse_shard_name, shard_name, write_shard

CHUNK = 1 << 20
INDEX_NAME = "SHA256SUMS"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class PartSink(Protocol):
    """Where a source puts the bytes of one part: the stager writes, counts and hashes them."""

    fd: int

    def write(self, offset: int, data: bytes) -> None: ...

    def copied(self, offset: int, n: int) -> None:
        """n bytes the kernel already copied to `offset` of fd (copy_file_range)."""


class TransferError(Exception):
    """A transient failure inside one ranged part (dropped connection, short body); the part is retried."""


@dataclass(frozen=True)
class Remote:
    name: str
    size: int
    sha256: str | None = None


def parse_index(text: str) -> dict[str, str]:
    """name -> sha256 from `sha256sum` output; lines that are not shards are ignored."""
    out = {}
    for line in text.splitlines():
        parts = line.strip().split()
        if len(parts) == 2 and _SHA256_RE.match(parts[0]) and parse_shard_name(parts[1].lstrip("*")):
            out[parts[1].lstrip("*")] = parts[0]
    return out


class Source:
    description: str
    ranged = True

    def available(self) -> list[str]:
        raise NotImplementedError

    def describe(self, name: str) -> Remote:
        raise NotImplementedError

    def fetch_range(self, remote: Remote, start: int, length: int, sink: PartSink) -> None:
        raise NotImplementedError

    def info(self) -> dict:
        return {}

    def _probe_names(self, exists: Callable[[str], bool]) -> list[str]:
        """Shard names of a source that cannot list: try val 0.. and train 1.. until the first gap."""
        names = []
        for split, first in (("val", 0), ("train", 1)):
            i = first
            with ThreadPoolExecutor(8) as pool:
                while True:
                    batch = [shard_name(split, j) for j in range(i, i + 8)]
                    found = list(pool.map(exists, batch))
                    names += [n for n, ok in zip(batch, found) if ok]
                    if not all(found):
                        break
                    i += 8
        return names


# ------------------------------------------------------------------------------------ directory


class DirectorySource(Source):
    """A mounted directory (NFS, Lustre, a local disk); parts are copied in the kernel."""

    def __init__(self, path: str):
        self.root = Path(path.removeprefix("file://")).expanduser()
        self.description = str(self.root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: source directory does not exist or is not a directory; check the path")
        index, earlier = self.root / INDEX_NAME, self.root / ".speedrun-shards.json"
        self.index = parse_index(index.read_text()) if index.is_file() else {}
        if not self.index and earlier.is_file():  # a directory we staged into knows its digests
            try:
                shards = json.loads(earlier.read_text()).get("shards", {})
                self.index = {n: rec["sha256"] for n, rec in shards.items() if rec.get("sha256")}
            except (ValueError, AttributeError, KeyError):
                self.index = {}

    def available(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if parse_shard_name(p.name))

    def describe(self, name: str) -> Remote:
        try:
            size = (self.root / name).stat().st_size
        except FileNotFoundError:
            raise DataError(f"{name}: missing from the source directory {self.root}; "
                           "ask for fewer shards or check the path") from None
        return Remote(name, size, self.index.get(name))

    def fetch_range(self, remote, start, length, sink):
        with open(self.root / remote.name, "rb") as src:
            pos, end = start, start + length
            while pos < end:
                try:  # in-kernel copy: no trip through user space
                    n = os.copy_file_range(src.fileno(), sink.fd, min(end - pos, 64 << 20), pos, pos)
                    sink.copied(pos, n)
                except OSError as e:  # cross-device on old kernels, or a filesystem without it
                    if e.errno not in (18, 22, 38, 95):
                        raise
                    data = os.pread(src.fileno(), min(end - pos, CHUNK), pos)
                    n = len(data)
                    sink.write(pos, data)
                if n == 0:
                    raise TransferError(f"{remote.name} ended at byte {pos} of {remote.size}")
                pos += n


# ----------------------------------------------------------------------------------------- http


class HttpSource(Source):
    """A mirror serving the shard files under one base URL (nginx, a bucket's website endpoint...)."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, use_index: bool = True):
        import requests

        self._requests = requests
        self.base = base_url.rstrip("/") + "/"
        self.description = redact(self.base)
        self.headers = headers or {}
        self._local = threading.local()
        self._final_url: dict[str, str] = {}
        self.index: dict[str, str] = {}
        if use_index:
            r = self._call("GET", self.base + INDEX_NAME, what=self.description)
            if r.status_code == 200:
                self.index = parse_index(r.text)
            elif r.status_code not in (403, 404):
                raise DataError(f"{self.description}: the server answered HTTP {r.status_code}; check the URL")

    def url_for(self, name: str) -> str:
        return self.base + name

    def _session(self):
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = self._requests.Session()
            s.headers.update(self.headers)
        return s

    def _call(self, method: str, url: str, what: str, **kw):
        try:
            return self._session().request(method, url, timeout=(10, 60), **kw)
        except self._requests.exceptions.ConnectionError as e:
            raise DataError(f"{what}: cannot reach the source at {redact(url)} ({_root_cause(e)}); "
                            "check the URL and that the server is up") from None
        except self._requests.exceptions.Timeout:
            raise DataError(f"{what}: the source at {redact(url)} did not answer in time; check the server") from None

    def available(self) -> list[str]:
        if self.index:
            return sorted(self.index)
        return self._probe_names(lambda n: self._head(n) is not None)

    def _head(self, name: str):
        r = self._call("HEAD", self.url_for(name), what=name, allow_redirects=True)
        if r.status_code == 404:
            return None
        if r.status_code >= 400:
            raise DataError(f"{name}: the source answered HTTP {r.status_code} for {redact(self.url_for(name))}")
        return r

    def describe(self, name: str) -> Remote:
        r = self._head(name)
        if r is None:
            raise DataError(f"{name}: not found at {redact(self.url_for(name))} (HTTP 404); the source has no such shard")
        first = r.history[0].headers if r.history else r.headers
        size = first.get("X-Linked-Size") or r.headers.get("Content-Length")
        if size is None:
            raise DataError(f"{name}: the source at {redact(self.url_for(name))} does not say the file's size")
        self._final_url[name] = r.url
        if r.headers.get("Accept-Ranges", "").lower() != "bytes":
            self.ranged = False
        etag = (first.get("X-Linked-Etag") or first.get("ETag") or "").removeprefix("W/").strip('"')
        digest = self.index.get(name) or (etag if _SHA256_RE.match(etag) else None)
        return Remote(name, int(size), digest)

    def fetch_range(self, remote, start, length, sink):
        url = self._final_url.get(remote.name) or self.url_for(remote.name)
        headers: dict[str, str | None] = {"Range": f"bytes={start}-{start + length - 1}"}
        if urlsplit(url).netloc != urlsplit(self.url_for(remote.name)).netloc:
            headers["Authorization"] = None  # a CDN redirect target must not see the hub token
        try:
            with self._session().get(url, headers=headers, stream=True, timeout=(10, 60)) as r:
                if r.status_code == 404:
                    raise DataError(f"{remote.name}: disappeared from the source ({redact(url)} answers 404)")
                if r.status_code not in (200, 206) or (r.status_code == 200 and (start or length != remote.size)):
                    raise TransferError(f"{remote.name}: HTTP {r.status_code} for bytes {start}-{start + length - 1}")
                offset = start
                for block in r.iter_content(CHUNK):
                    block = block[: start + length - offset]
                    sink.write(offset, block)
                    offset += len(block)
                    if offset >= start + length:
                        break
        except (self._requests.exceptions.ConnectionError, self._requests.exceptions.ChunkedEncodingError,
                self._requests.exceptions.Timeout) as e:
            raise TransferError(f"{remote.name}: {_root_cause(e)}") from None
        if offset < start + length:
            raise TransferError(f"{remote.name}: the server sent {offset - start} of {length} bytes")


class HubSource(HttpSource):
    """hf://datasets/OWNER/NAME[@REVISION][/FOLDER], fetched over the hub's resolve URLs (HF_ENDPOINT respected)."""

    def __init__(self, url: str):
        from huggingface_hub.utils import build_hf_headers

        m = re.match(r"^hf://datasets/([^/@]+/[^/@]+)(?:@([^/]+))?(?:/(.*))?$", url)
        if not m:
            raise DataError(f"{url}: not a Hugging Face dataset URL; use hf://datasets/OWNER/NAME[@REVISION][/FOLDER]")
        self.repo_id, self.revision, self.folder = m.group(1), m.group(2) or "main", (m.group(3) or "").strip("/")
        self.endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        super().__init__(self.endpoint, headers=build_hf_headers(), use_index=False)
        self.description = url

    def url_for(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, name, subfolder=self.folder or None, repo_type="dataset",
                          revision=self.revision, endpoint=self.endpoint)

    def info(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision, "endpoint": self.endpoint}


# ------------------------------------------------------------------------------------------- s3


class S3Source(Source):
    """s3://bucket/prefix through boto3; the endpoint comes from AWS_ENDPOINT_URL like every AWS tool."""

    def __init__(self, url: str):
        import boto3
        import botocore.config
        import botocore.exceptions

        self._exc = botocore.exceptions
        parts = urlsplit(url)
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        self.description = url
        if not self.bucket:
            raise DataError(f"{url}: no bucket in the S3 URL; use s3://BUCKET/PREFIX")
        self.client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
                                   config=botocore.config.Config(max_pool_connections=32,
                                                                 retries={"max_attempts": 3}))
        self.sizes: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=self.prefix + "/" if self.prefix else ""):
                for obj in page.get("Contents", []):
                    self.sizes[obj["Key"].rsplit("/", 1)[-1]] = obj["Size"]
        except self._exc.EndpointConnectionError as e:
            raise DataError(f"{url}: cannot reach the S3 endpoint ({e}); check AWS_ENDPOINT_URL and the network") from None
        except self._exc.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "error")
            raise DataError(f"{url}: S3 refused to list the prefix ({code}); check the bucket name and credentials") from None
        except self._exc.NoCredentialsError:
            raise DataError(f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile") from None
        self.index = {}
        if INDEX_NAME in self.sizes:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(INDEX_NAME))["Body"].read()
            self.index = parse_index(body.decode())

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def available(self) -> list[str]:
        return sorted(n for n in self.sizes if parse_shard_name(n))

    def describe(self, name: str) -> Remote:
        if name not in self.sizes:
            raise DataError(f"{name}: missing from {self.description}; ask for fewer shards or check the prefix")
        return Remote(name, self.sizes[name], self.index.get(name))

    def fetch_range(self, remote, start, length, sink):
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(remote.name),
                                          Range=f"bytes={start}-{start + length - 1}")["Body"]
            offset = start
            for block in body.iter_chunks(CHUNK):
                sink.write(offset, block)
                offset += len(block)
        except (self._exc.EndpointConnectionError, self._exc.ReadTimeoutError,
                self._exc.ResponseStreamingError) as e:
            raise TransferError(f"{remote.name}: {e}") from None
        except self._exc.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "error")
            if str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")).startswith("5"):
                raise TransferError(f"{remote.name}: S3 answered {code}") from None
            raise DataError(f"{remote.name}: S3 refused the download ({code}); check the object and credentials") from None
        if offset < start + length:
            raise TransferError(f"{remote.name}: S3 sent {offset - start} of {length} bytes")


# ------------------------------------------------------------------------------------ synthetic


class SyntheticSource(Source):
    """synthetic://markov?...: shards generated on the spot; one 'part' is a whole shard."""

    ranged = False

    def __init__(self, url: str):
        from orchestrator.data.synthetic import MarkovSource

        self.markov = MarkovSource.from_url(url)
        self.description = self.markov.params.url()
        self._names = {name: (split, i) for split, i, name in self.markov.shard_names()}

    def available(self) -> list[str]:
        return sorted(self._names)

    def describe(self, name: str) -> Remote:
        if name not in self._names:
            raise DataError(f"{name}: {self.description} has no such shard; raise train_shards/val_shards in the URL")
        return Remote(name, 1024 + 2 * self.markov.params.shard_tokens, None)

    def generate_into(self, name: str, path: Path) -> str:
        return write_shard(path, self.markov.generate(*self._names[name])).sha256

    def info(self) -> dict:
        return self.markov.info()


def open_source(source: str) -> Source:
    """The Source for a URL or a directory path; DataError for an unknown scheme."""
    scheme = source.split("://", 1)[0].lower() if "://" in source else "file"
    kinds = {"file": DirectorySource, "http": HttpSource, "https": HttpSource, "hf": HubSource, "s3": S3Source,
             "synthetic": SyntheticSource}
    extra = {"hf": "hf", "s3": "s3"}
    if scheme in kinds:
        try:
            return kinds[scheme](source)
        except ImportError as e:
            raise DataError(f"{source}: this source needs the Python package {e.name!r}; "
                            f"pip install 'speedrun[{extra.get(scheme, 'dev')}]'") from None
    raise DataError(f"{source}: unknown source scheme {scheme!r}; use a directory, http(s)://, hf://, s3:// or synthetic://")


def redact(url: str) -> str:
    """The URL without user:password@ and query values, fit for logs, errors and env.json."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(f"{kv.split('=', 1)[0]}=***" for kv in parts.query.split("&")) if parts.query else ""
    return parts._replace(netloc=netloc, query=query).geturl()


def _root_cause(e: BaseException) -> str:
    while e.__cause__ or e.__context__:
        e = e.__cause__ or e.__context__
    text = str(e)
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    return m.group(1).strip() if m else text[:120]
