"""Compare-and-swap writes of one small object in the artifact store: create it only if absent, replace or delete it
only if it is still the version read — local files under an exclusive flock, S3 with If-None-Match / If-Match.

moto 5.2.5's server (the tests' endpoint) was checked to enforce all three: a second If-None-Match create and an
If-Match put or delete of another ETag answer 412 PreconditionFailed, an If-Match on a missing key 404 NoSuchKey. On
an endpoint that ignored the headers, replace_if and delete_if still compare the version read just before (a window of
two requests), and the campaign lease warns when a second create was not refused (metareward.pipeline.lease.acquire)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fsspec.asyn import sync

from metareward.artifacts.store import ArtifactStore, write_synced

_CONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"}
_CONDITION_STATUSES = {409, 412}
"""S3 answers that mean the condition did not hold: the object exists (If-None-Match), is another version or is gone
(If-Match), or another conditional write to it was in flight (AWS answers 409 to one of two racing writes)."""


def read_versioned(store: ArtifactStore, key: str) -> tuple[bytes, str] | None:
    """The object's bytes and version (S3: its ETag; local: the digest of its bytes), read in one request; None
    when there is no object at key."""
    if store.protocol == "file":
        try:
            data = Path(store.uri(key)).read_bytes()
        except FileNotFoundError:
            return None
        return data, _local_version(data)
    bucket, path, _ = store.fs.split_path(store.uri(key))

    async def get() -> tuple[bytes, str]:
        response = await store.fs._call_s3("get_object", Bucket=bucket, Key=path)
        try:
            return await response["Body"].read(), response["ETag"]
        finally:
            response["Body"].close()

    try:
        return sync(store.fs.loop, get)
    except FileNotFoundError:
        return None


def create_exclusive(store: ArtifactStore, key: str, data: bytes) -> str | None:
    """Create the object at key with `data` only if there is none, atomically: two callers never both succeed,
    and a reader sees the whole object or none. Returns its version, or None when an object was already there.
    Local: a complete temporary file hard-linked into place (link fails if the name exists). S3: PutObject with
    If-None-Match: *."""
    if store.protocol == "file":
        target = Path(store.uri(key))
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target):
            temporary = _write_temporary(target, data)
            try:
                os.link(temporary, target)
            except FileExistsError:
                return None
            finally:
                temporary.unlink()
        return _local_version(data)
    return _put(store, key, data, IfNoneMatch="*")


def replace_if(store: ArtifactStore, key: str, data: bytes, version: str) -> str | None:
    """Replace the object at key with `data` only if it is still `version`; returns the new version, or None when
    the object is another version or gone. The version is read and compared first; then, local: compared again and
    renamed into place under an exclusive flock on KEY.lock that every conditional write of the key holds; S3:
    PutObject with If-Match: VERSION."""
    if not _is_version(store, key, version):
        return None
    if store.protocol == "file":
        target = Path(store.uri(key))
        with _locked(target):
            if not _is_version(store, key, version):
                return None
            os.replace(_write_temporary(target, data), target)
        return _local_version(data)
    return _put(store, key, data, IfMatch=version)


def delete_if(store: ArtifactStore, key: str, version: str) -> bool:
    """Delete the object at key only if it is still `version`; returns whether it was deleted. As replace_if:
    local under the key's flock, S3 with DeleteObject If-Match: VERSION."""
    if not _is_version(store, key, version):
        return False
    if store.protocol == "file":
        target = Path(store.uri(key))
        with _locked(target):
            if not _is_version(store, key, version):
                return False
            target.unlink()
        return True
    bucket, path, _ = store.fs.split_path(store.uri(key))
    try:
        store.fs.call_s3("delete_object", Bucket=bucket, Key=path, IfMatch=version)
    except Exception as error:  # s3fs translates botocore's ClientError into OSError subclasses
        if _condition_failed(error):
            return False
        raise
    return True


def _is_version(store: ArtifactStore, key: str, version: str) -> bool:
    current = read_versioned(store, key)
    return current is not None and current[1] == version


def _put(store: ArtifactStore, key: str, data: bytes, **condition: str) -> str | None:
    bucket, path, _ = store.fs.split_path(store.uri(key))
    try:
        response = store.fs.call_s3("put_object", Bucket=bucket, Key=path, Body=data, **condition)
    except Exception as error:  # s3fs translates botocore's ClientError into OSError subclasses
        if _condition_failed(error):
            return None
        raise
    store.fs.invalidate_cache(store.uri(key))
    return response["ETag"]


def _condition_failed(error: BaseException | None) -> bool:
    """Whether a failed S3 request failed because its condition did not hold (s3fs raises FileExistsError for
    If-None-Match; for If-Match an OSError caused by botocore's ClientError, whose code says so)."""
    while error is not None:
        if isinstance(error, FileExistsError):
            return True
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in _CONDITION_CODES or status in _CONDITION_STATUSES
        error = error.__cause__
    return False


def _local_version(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _write_temporary(target: Path, data: bytes) -> Path:
    """A complete, synced file beside target, to be linked or renamed into place."""
    temporary = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
    write_synced(temporary, data)
    return temporary


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    """An exclusive flock on TARGET.lock for one read-compare-write; the kernel drops it if the process dies, so
    it is never stale. The lock file stays (removing it would let two holders lock different files)."""
    with open(target.with_name(target.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
