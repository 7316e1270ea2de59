"""Result storage behind a small interface: local disk (the default) or S3 via boto3.

Keys are deterministic per tenant, job and image index, so a redelivered upload
overwrites instead of duplicating. A write is all or nothing: local files are
renamed into place, S3 objects appear only when complete; both are verified
before the job records them.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse


class ObjectMissing(KeyError):
    """No object is stored under the key."""


class StorageError(OSError):
    """A write could not be completed or verified."""


class ResultStorage(Protocol):
    """Where images live; keys are relative paths like `tenant/job/0.webp`."""

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store `data` under `key`, replacing any previous object, all or nothing."""

    def get(self, key: str) -> bytes:
        """The object's bytes; ObjectMissing if absent."""

    def delete(self, key: str) -> None:
        """Remove the object if present."""

    def copy(self, src_key: str, dst_key: str) -> None:
        """Store a copy of `src_key` under `dst_key`, all or nothing; ObjectMissing if absent.

        The copy lives on when the source is deleted, and the other way round.
        """

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        """A URL serving the object without credentials until it expires, or None.

        None means the backend cannot make one; the API then signs its own links.
        """

    def keys(self, prefix: str) -> Iterator[str]:
        """The key of every object whose key starts with `prefix`, lazily, a page at a time.

        `prefix` is a plain string prefix (`tenant/job/` lists one job's images; "" lists
        everything). Writes still in progress are not objects yet and are not listed.
        """


class LocalStorage:
    """Files under a root folder; writes go to a temp file first, then an atomic rename."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        # Keys are built by the farm, but a key must never escape the root.
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"invalid storage key {key!r}")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store atomically: readers see the old object or the whole new one."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        """Read the whole object."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(key) from None

    def delete(self, key: str) -> None:
        """Remove the file if present."""
        self._path(key).unlink(missing_ok=True)

    def copy(self, src_key: str, dst_key: str) -> None:
        """A hard link under a temp name renamed into place: no bytes copied, atomic.

        Deleting either name leaves the other; objects are never changed in place
        (`put` renames a new file over the old name). Where links are refused (another
        file system), the bytes are copied.
        """
        source = self._path(src_key)
        path = self._path(dst_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-link-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            os.link(source, tmp)
        except FileNotFoundError:
            raise ObjectMissing(src_key) from None
        except OSError:
            self.put(dst_key, self.get(src_key), "")
            return
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        """Local files have no URL of their own; the API serves them through signed links."""
        return None

    def keys(self, prefix: str) -> Iterator[str]:
        """Walk the folder the prefix names (sorted, one folder at a time); skip temp files."""
        _check_prefix(prefix)
        folder, _, _ = prefix.rpartition("/")
        start = self.root / folder if folder else self.root
        if not start.resolve().is_relative_to(self.root):
            raise ValueError(f"invalid storage prefix {prefix!r}")
        yield from self._walk(start, prefix)

    def _walk(self, folder: Path, prefix: str) -> Iterator[str]:
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if entry.name.startswith(".tmp-"):
                continue  # a write in progress (or one a crash abandoned), never an object
            key = Path(entry.path).relative_to(self.root).as_posix()
            if entry.is_dir(follow_symlinks=False):
                if (key + "/").startswith(prefix) or prefix.startswith(key + "/"):
                    yield from self._walk(Path(entry.path), prefix)
            elif key.startswith(prefix):
                yield key


class S3Storage:
    """Objects in an S3-compatible bucket under an optional prefix.

    boto3 finds credentials through the standard AWS chain and honours
    AWS_ENDPOINT_URL (MinIO, R2, Ceph); requests are always signed with SigV4.
    """

    def __init__(self, bucket: str, prefix: str = "", client: Any = None) -> None:
        # Imported here: hosts that keep results on local disk need not install boto3.
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # Keys per ListObjectsV2 request (S3's own maximum is 1000).
        self.list_page_size = 1000
        self.client = client or boto3.client(
            "s3",
            config=Config(
                signature_version="s3v4",
                retries={"mode": "standard", "max_attempts": 3},
                s3={"addressing_style": "path"},
                # An endpoint that drops packets fails a call in seconds, not minutes
                # (botocore's defaults are 60 s each): callers retry on their own terms.
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid storage key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Upload with a SHA-256 checksum the server verifies, then check what it stored."""
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")
        object_key = self._key(key)
        self.client.put_object(
            Bucket=self.bucket,
            Key=object_key,
            Body=data,
            ContentType=content_type,
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=checksum,
        )
        head = self.client.head_object(Bucket=self.bucket, Key=object_key, ChecksumMode="ENABLED")
        stored = head.get("ChecksumSHA256")
        if head["ContentLength"] != len(data) or (stored is not None and stored != checksum):
            raise StorageError(f"upload of {object_key!r} could not be verified")

    def get(self, key: str) -> bytes:
        """Download the whole object."""
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectMissing(key) from None
            raise
        data: bytes = response["Body"].read()
        return data

    def delete(self, key: str) -> None:
        """Delete the object (S3 answers success for a missing one too)."""
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def copy(self, src_key: str, dst_key: str) -> None:
        """A server-side copy (CopyObject): the bytes never leave the store."""
        from botocore.exceptions import ClientError

        try:
            self.client.copy_object(
                Bucket=self.bucket,
                Key=self._key(dst_key),
                CopySource={"Bucket": self.bucket, "Key": self._key(src_key)},
                MetadataDirective="COPY",
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectMissing(src_key) from None
            raise

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        """A SigV4 presigned GET URL, valid for `expires_s` seconds."""
        url: str = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=expires_s,
        )
        return url

    def keys(self, prefix: str) -> Iterator[str]:
        """ListObjectsV2 pages under the bucket prefix plus `prefix` (S3 lists in key order)."""
        _check_prefix(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=base + prefix,
            PaginationConfig={"PageSize": self.list_page_size},
        )
        for page in pages:
            for listed in page.get("Contents", []):
                yield str(listed["Key"])[len(base) :]


def _check_prefix(prefix: str) -> None:
    """A listing prefix is a key's beginning: relative, never climbing out of the root."""
    if prefix.startswith("/") or ".." in prefix.split("/"):
        raise ValueError(f"invalid storage prefix {prefix!r}")


def make_storage(url: str) -> ResultStorage:
    """Build the backend a storage URL names: `file:///path` or `s3://bucket/prefix`."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStorage(Path(parsed.netloc + parsed.path))
    if parsed.scheme == "s3" and parsed.netloc:
        return S3Storage(parsed.netloc, parsed.path)
    raise ValueError(f"unsupported storage URL {url!r}: use file:///path or s3://bucket/prefix")
