"""Result storage behind a small interface; local disk is the default backend."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse


class ObjectMissing(KeyError):
    """No object is stored under the key."""


class ResultStorage(Protocol):
    """Where images live; keys are relative paths like `tenant/job/0.webp`."""

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store `data` under `key`, replacing any previous object, all or nothing."""

    def get(self, key: str) -> bytes:
        """The object's bytes; ObjectMissing if absent."""

    def delete(self, key: str) -> None:
        """Remove the object if present."""


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


def make_storage(url: str) -> ResultStorage:
    """Build the backend a storage URL names (`file:///path`)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStorage(Path(parsed.netloc + parsed.path))
    raise ValueError(
        f"unsupported storage URL {url!r}: this version stores results on local disk (file://)"
    )
