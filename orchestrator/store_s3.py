"""The S3 store (AWS, R2, MinIO, any endpoint): boto3 calls, retries on transient errors, and errors that name
the fix. `open_store("s3://bucket/prefix")` loads this module; boto3 is imported only when a store is opened.

S3 PUT and completed multipart uploads are atomic by themselves. Credentials come ONLY from boto3's usual chain
(environment, ~/.aws, instance role); nothing here reads them.
"""
from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path

from orchestrator.store import PARTIAL_SUFFIX, ObjectInfo, Store, StoreError, _prefix, sha256_file, validate_key

log = logging.getLogger(__name__)

# Error codes S3-compatible services answer when they want the client to slow down or try again.
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                   "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests", "500", "502", "503", "504"}


def _transient(e: BaseException) -> bool:
    import boto3.exceptions
    import botocore.exceptions as be

    if isinstance(e, (be.HTTPClientError, be.ConnectionError, boto3.exceptions.RetriesExceededError)):
        return True
    if isinstance(e, be.ClientError):
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code") in TRANSIENT_CODES or status >= 500 or status == 429
    if isinstance(e, boto3.exceptions.S3UploadFailedError):  # upload_file wraps the ClientError in text
        return any(code in str(e) for code in TRANSIENT_CODES) or "onnect" in str(e)
    return False


def _unix(when) -> float | None:
    """An S3 LastModified (a datetime) as unix time; None where the service gave none."""
    return when.timestamp() if when is not None else None


class S3Store(Store):
    """boto3 client with botocore's standard retries (backoff with jitter on throttling and dropped
    connections) inside a tenacity loop that keeps trying for `retry_budget_s` (endpoint restarts,
    network blips); multipart and concurrent parts through TransferConfig."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str | None = None,
                 retry_budget_s: float = 300.0, max_attempts: int = 6, max_concurrency: int = 8, part_mb: int = 16):
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError:
            raise StoreError("s3:// stores need boto3; install the [s3] extra: pip install 'speedrun[s3]'") from None
        self.bucket, self.prefix, self.endpoint_url = bucket, prefix.strip("/"), endpoint_url
        self.root_url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.retry_budget_s = retry_budget_s
        config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=10,
            read_timeout=120,
            max_pool_connections=64,  # several files at once, each with max_concurrency parts
            # Path-style addressing: MinIO and loopback endpoints have no per-bucket DNS names.
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        # Credentials: boto3's chain only (env, ~/.aws, instance role); nothing here reads them.
        self.client = boto3.session.Session(region_name=region).client("s3", endpoint_url=endpoint_url, config=config)
        self.transfer = TransferConfig(multipart_threshold=part_mb << 20, multipart_chunksize=part_mb << 20,
                                       max_concurrency=max_concurrency, use_threads=True)

    def _full(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str) -> str:
        return f"{self.root_url}/{key}" if key else self.root_url

    def _call(self, what: str, key: str, fn):
        from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

        def note(state) -> None:
            # The first failure and every fifth after it: a long outage should not flood the node's log.
            level = logging.WARNING if state.attempt_number % 5 == 1 else logging.DEBUG
            log.log(level, "%s %s: attempt %d failed (%s); retrying", what, self._where(key),
                        state.attempt_number, type(state.outcome.exception()).__name__)

        try:
            for attempt in Retrying(retry=retry_if_exception(_transient), reraise=True, before_sleep=note,
                                    wait=wait_random_exponential(multiplier=0.5, max=15),
                                    stop=stop_after_delay(self.retry_budget_s)):
                with attempt:
                    result = fn()
            return result
        except StoreError:
            raise
        except Exception as e:
            raise self._explain(e, what, key) from e

    def _explain(self, e: Exception, what: str, key: str) -> StoreError:
        import botocore.exceptions as be

        where = self._where(key)
        if isinstance(e, (be.NoCredentialsError, be.PartialCredentialsError)):
            return StoreError(f"{where}: boto3 found no complete AWS credentials (environment, ~/.aws, instance role); "
                              "set them on this machine, never in a job file")
        if isinstance(e, be.ClientError):
            code = e.response.get("Error", {}).get("Code", "?")
            if code == "NoSuchBucket":
                return StoreError(f"{where}: bucket {self.bucket!r} does not exist; create it or fix the store URL")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StoreError(f"{where}: {what} refused ({code}); check the credentials' permissions on the bucket")
            return StoreError(f"{where}: {what} failed ({code}: {e.response.get('Error', {}).get('Message', '')})")
        if _transient(e):
            return StoreError(f"{where}: {what} failed after retrying for {self.retry_budget_s:.0f}s "
                              f"({type(e).__name__}); check that {self.endpoint_url or 'S3'} is reachable")
        return StoreError(f"{where}: {what} failed ({type(e).__name__}: {e})")

    def put_file(self, local_path, key, sha256=None):
        full, size = self._full(key), os.path.getsize(local_path)
        sha256 = sha256 or sha256_file(local_path)
        extra = {"Metadata": {"sha256": sha256}}
        self._call("upload", key, lambda: self.client.upload_file(os.fspath(local_path), self.bucket, full,
                                                                 ExtraArgs=extra, Config=self.transfer))
        return ObjectInfo(key, size, sha256)

    def put_bytes(self, data, key):
        full, digest = self._full(key), hashlib.sha256(data).hexdigest()
        self._call("upload", key, lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data,
                                                                Metadata={"sha256": digest}))
        return ObjectInfo(key, len(data), digest)

    def put_new(self, data, key):
        import botocore.exceptions as be

        full, digest = self._full(key), hashlib.sha256(data).hexdigest()
        try:  # S3 conditional write: If-None-Match: * fails with 412 when the key exists
            self._call("upload", key, lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data,
                                                                    Metadata={"sha256": digest}, IfNoneMatch="*"))
        except StoreError as e:
            cause = e.__cause__
            if isinstance(cause, be.ClientError) and cause.response.get("Error", {}).get("Code") in (
                    "PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def get_file(self, key, local_path):
        full, dest = self._full(key), Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
        try:
            self._call("download", key, lambda: self.client.download_file(self.bucket, full, os.fspath(tmp),
                                                                         Config=self.transfer))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def get_bytes(self, key):
        full = self._full(key)
        return self._call("download", key, lambda: self.client.get_object(Bucket=self.bucket, Key=full)["Body"].read())

    def stat(self, key):
        import botocore.exceptions as be

        full = self._full(key)

        def head():
            try:
                return self.client.head_object(Bucket=self.bucket, Key=full)
            except be.ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

        r = self._call("stat", key, head)
        if r is None:
            return None
        return ObjectInfo(key, int(r["ContentLength"]), r.get("Metadata", {}).get("sha256"),
                          _unix(r.get("LastModified")))

    def list(self, prefix=""):
        prefix = _prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0

        def pages():
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                out += [ObjectInfo(o["Key"][strip:], int(o["Size"]), modified=_unix(o.get("LastModified")))
                        for o in page.get("Contents", [])]
            return out

        return sorted(self._call("list", prefix, pages), key=lambda o: o.key)

    def delete(self, key):
        full = self._full(key)
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=full))

    def abort_partial(self, prefix=""):
        """Abort multipart uploads left by a killed uploader: invisible, but billed and never completed."""
        prefix = _prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix

        def abort():
            n = 0
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=full):
                for u in page.get("Uploads", []):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
                    n += 1
            return n

        return self._call("abort partial uploads", prefix, abort)
