"""The artifact store over fsspec (local folder or s3://): stable paths, atomic Parquet/JSON writes, digests."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import posixpath
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fsspec
import polars as pl

log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """The artifact store cannot be used (missing bucket, unreachable endpoint, denied); says which and why."""


class CorruptArtifactError(StoreError):
    """An artifact that is not what its marker recorded (other bytes, another size) or that is not readable
    Parquet; the message names its URI."""


class StoreFullError(StoreError):
    """A local artifact root's disk (or quota) is full: nothing of the write is left behind, and the message names
    the file, the bytes it needed and the bytes free, and says to free space and run again."""


@dataclass(frozen=True)
class TableRef:
    """A table written to the store: where, how many rows, the blake2b digest of its Parquet bytes, their size,
    and on S3 the object's ETag (size and ETag are None in markers written before they were kept)."""

    uri: str
    rows: int
    digest: str
    size: int | None = None
    etag: str | None = None

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> TableRef:
        """The reference in a marker's or manifest's entry (other keys of the entry are ignored)."""
        return cls(fields["uri"], fields["rows"], fields["digest"], fields.get("size"), fields.get("etag"))

    def as_dict(self) -> dict[str, Any]:
        """Plain fields, for markers and manifests."""
        return asdict(self)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


S3_RETRY_MODE = "standard"
"""botocore's retry mode for the store's S3 calls, unless AWS_RETRY_MODE says otherwise: exponential backoff with
jitter. "adaptive" also slows the whole client after a throttle: measured here, a burst of 8 writes each throttled
twice took ~20 s with it, ~2.5 s without."""
S3_MAX_ATTEMPTS = 10
"""Attempts of one S3 call, the first included, before it fails, unless AWS_MAX_ATTEMPTS says otherwise."""


def s3_storage_options() -> dict[str, Any]:
    """s3fs options from the standard environment: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (MinIO, moto), and
    botocore's retry mode and attempts (AWS_RETRY_MODE, default standard; AWS_MAX_ATTEMPTS, default 10).
    Credentials and region stay in the environment, where s3fs/botocore read them: they are never copied
    into options, logs, Prefect parameters or MLflow params."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict[str, Any] = {}
    if endpoint and "@" in endpoint.split("://", 1)[-1].split("/", 1)[0]:
        # These options are saved in a Prefect block (result storage): the endpoint must carry no credentials.
        raise StoreError("AWS_ENDPOINT_URL_S3 holds credentials (user:password@): give the endpoint alone and the "
                         "credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    # Throttling (503 SlowDown; a 429 whose code says throttling) and transient errors are retried by botocore
    # itself, with backoff. botocore's own variables are read here because a retries setting in the client config
    # overrides them; "total_max_attempts" because botocore's client config reads "max_attempts" as the retries
    # after the first attempt, AWS_MAX_ATTEMPTS as all attempts.
    attempts = os.environ.get("AWS_MAX_ATTEMPTS", str(S3_MAX_ATTEMPTS))
    if not attempts.isdigit() or int(attempts) < 1:
        raise StoreError(f"AWS_MAX_ATTEMPTS={attempts!r}: give a whole number of attempts of one S3 call, at least 1 "
                         "(the first attempt included)")
    options["config_kwargs"] = {"retries": {"mode": os.environ.get("AWS_RETRY_MODE", S3_RETRY_MODE),
                                            "total_max_attempts": int(attempts)}}
    return options


class ArtifactStore:
    """Artifacts under one root: a local folder (default) or s3://bucket/prefix.

    Keys are relative POSIX paths ("demo/iter-1/judge/shard-0003-ab12.parquet"). Every write is atomic: a
    local file is written beside its target and renamed over it; an S3 object is uploaded in one PUT
    (`pipe`), so a reader never sees half a file and a failed write leaves no object.
    """

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        if root.startswith("s3://") or root.startswith("s3a://"):
            self.protocol = "s3"
            self.root = "s3://" + root.split("://", 1)[1].rstrip("/")
            self.options = {**s3_storage_options(), **(storage_options or {})}
        else:
            self.protocol = "file"
            self.root = str(Path(root.removeprefix("file://")).expanduser().resolve())
            self.options = storage_options or {}
        self.fs = fsspec.filesystem(self.protocol, **self.options)
        if self.protocol == "s3":
            # Creating the client calls no endpoint; unique_id: s3fs hands out one instance for equal options.
            self.fs.connect()
            self.fs.s3.meta.events.register("after-call.s3", _warn_of_retries, unique_id="metareward-s3-retries")

    def uri(self, key: str) -> str:
        """The full URI (s3://…) or absolute path of a key."""
        return posixpath.join(self.root, key) if self.protocol == "s3" else str(Path(self.root) / key)

    def check(self) -> None:
        """Fail fast, before any model work, when the root cannot be written: the bucket is missing, the
        endpoint is unreachable, or access is denied. Writes and removes a small probe object."""
        probe = self.uri(f"_probe/{uuid.uuid4().hex}")
        fs = self.fs
        if self.protocol == "s3":
            # One quick attempt: the point is to fail in seconds, not after s3fs's and botocore's retries.
            config = self.options.get("config_kwargs", {})
            retries = {"mode": config.get("retries", {}).get("mode", S3_RETRY_MODE), "total_max_attempts": 1}
            fs = fsspec.filesystem("s3", skip_instance_cache=True, **{
                **self.options, "config_kwargs": {**config, "connect_timeout": 5, "retries": retries}})
            fs.retries = 1
        try:
            if self.protocol == "file":
                self.write_bytes(self.key_of(probe), b"ok")
            else:
                fs.pipe(probe, b"ok")
            fs.rm(probe)
        except StoreFullError:
            raise
        except FileNotFoundError as error:
            raise StoreError(f"artifact root {self.root}: bucket or folder does not exist ({error})") from None
        except PermissionError as error:
            raise StoreError(f"artifact root {self.root}: access denied ({error})") from None
        except OSError as error:
            raise StoreError(f"artifact root {self.root}: cannot write ({type(error).__name__}: {error})") from None
        except Exception as error:  # botocore/aiohttp raise their own types for an unreachable endpoint
            raise StoreError(f"artifact root {self.root}: unreachable ({type(error).__name__}: {error})") from None

    def exists(self, key: str) -> bool:
        """Whether the key exists now (S3: not answered from s3fs's listing cache)."""
        self.fs.invalidate_cache()
        return self.fs.exists(self.uri(key))

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write bytes atomically (see class docstring). A local disk that fills up raises StoreFullError."""
        target = self.uri(key)
        if self.protocol == "file":
            _replace_atomically(target, len(data), lambda temporary: write_synced(temporary, data))
        else:
            self.fs.pipe(target, data)

    def read_bytes(self, key: str) -> bytes:
        """The bytes of a key; FileNotFoundError names the URI when it is missing."""
        try:
            return self.fs.cat_file(self.uri(key))
        except FileNotFoundError:
            raise FileNotFoundError(f"artifact {self.uri(key)} does not exist") from None

    def write_table(self, key: str, table: pl.DataFrame) -> TableRef:
        """Write a table as Parquet (zstd) atomically; return its reference with row count, digest and size."""
        buffer = io.BytesIO()
        table.write_parquet(buffer, compression="zstd")
        data = buffer.getvalue()
        self.write_bytes(key, data)
        etag = self.fs.info(self.uri(key)).get("ETag") if self.protocol == "s3" else None
        return TableRef(self.uri(key), table.height, _digest(data), len(data), etag)

    def read_table(self, table: TableRef | str, columns: list[str] | None = None) -> pl.DataFrame:
        """Read a Parquet table (only `columns`, when given) by key, by URI, or by reference — then its bytes must
        have the reference's digest. Raises CorruptArtifactError naming the URI when they do not or when they are
        not readable Parquet, FileNotFoundError when the table is missing."""
        uri = table.uri if isinstance(table, TableRef) else self.uri(self.key_of(table))
        data = self._checked_bytes(table) if isinstance(table, TableRef) else self.read_bytes(self.key_of(uri))
        try:
            return pl.read_parquet(io.BytesIO(data), columns=columns)
        except Exception as error:  # polars raises several types for a damaged file
            raise CorruptArtifactError(f"artifact {uri} is not a readable Parquet table ({error})") from None

    def read_tables(self, tables: list[TableRef], columns: list[str] | None = None) -> pl.DataFrame:
        """The concatenation of the referenced tables, in order (only `columns`, when given), each checked
        against its digest (see read_table)."""
        return pl.concat([self.read_table(table, columns) for table in tables], how="vertical")

    def move(self, key: str, new_key: str) -> None:
        """Move the object at key to new_key, replacing what is there (local: one rename; S3: a server-side copy,
        then the original is deleted)."""
        if self.protocol == "file":
            Path(self.uri(new_key)).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.uri(key), self.uri(new_key))
        else:
            self.fs.mv(self.uri(key), self.uri(new_key))

    def read_tables_where(self, tables: list[TableRef], predicate: pl.Expr,
                          columns: list[str] | None = None) -> pl.DataFrame:
        """The rows of the referenced tables that satisfy `predicate` (only `columns`, when given; the predicate may
        read others), in order, each table's bytes checked against its digest first (CorruptArtifactError and
        FileNotFoundError as read_table). The predicate is pushed down to the Parquet reader, which decodes the other
        columns of the kept rows alone: memory holds those and one table's bytes, never a whole table."""
        kept = []
        for table in tables:
            scan = pl.scan_parquet(io.BytesIO(self._checked_bytes(table)))
            try:
                kept.append(scan.filter(predicate).select(columns or pl.all()).collect())
            except Exception as error:  # polars raises several types for a damaged file
                raise CorruptArtifactError(f"artifact {table.uri} is not a readable Parquet table ({error})") from None
        return pl.concat(kept, how="vertical")

    def _checked_bytes(self, table: TableRef) -> bytes:
        """The bytes of a referenced table; CorruptArtifactError naming its URI when they are not its digest's."""
        data = self.read_bytes(self.key_of(table.uri))
        if _digest(data) != table.digest:
            raise CorruptArtifactError(f"artifact {table.uri} is not the table its marker recorded: digest "
                                       f"{_digest(data)}, {len(data)} bytes; recorded {table.digest}, "
                                       f"{table.size} bytes")
        return data

    def delete(self, key: str) -> None:
        """Remove the object at key (nothing when there is none)."""
        if self.exists(key):
            self.fs.rm(self.uri(key))

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under prefix and, in a local root, its folders (nothing when there is none)."""
        if self.list(prefix) or self.exists(prefix):
            self.fs.rm(self.uri(prefix), recursive=True)

    def mismatch(self, table: TableRef) -> str | None:
        """Why the stored object is not the table `table` records — missing, another size, other bytes (local:
        its digest, read from disk; S3: its ETag, from one HEAD request) — or None when it is."""
        self.fs.invalidate_cache()
        try:
            info = self.fs.info(table.uri)
        except FileNotFoundError:
            return f"its table {table.uri} is missing"
        if table.size is not None and int(info["size"]) != table.size:
            return f"its table {table.uri} is {info['size']} bytes, its marker recorded {table.size}"
        if self.protocol == "s3":
            if table.etag is not None and info.get("ETag") != table.etag:
                return f"its table {table.uri} was replaced (ETag {info.get('ETag')}, its marker recorded {table.etag})"
            return None
        digest = hashlib.blake2b(digest_size=8)
        with open(table.uri, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != table.digest:
            return f"its table {table.uri} has digest {digest.hexdigest()}, its marker recorded {table.digest}"
        return None

    def write_json(self, key: str, value: Any) -> None:
        """Write a JSON document atomically."""
        self.write_bytes(key, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, key: str) -> Any:
        """Read a JSON document."""
        return json.loads(self.read_bytes(key))

    def key_of(self, key_or_uri: str) -> str:
        """The key of a URI under this root (a key is returned unchanged)."""
        prefix = self.root.rstrip("/") + "/"
        return key_or_uri[len(prefix):] if key_or_uri.startswith(prefix) else key_or_uri

    def list(self, prefix: str) -> list[str]:
        """Keys under a prefix, sorted; empty when the prefix does not exist."""
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.uri(prefix))
        except FileNotFoundError:
            return []
        keys = [self.key_of(path if self.protocol == "file" else "s3://" + path) for path in found]
        return sorted(key for key in keys if not key.endswith(".tmp"))

    def put_file(self, local_file: str | Path, key: str) -> None:
        """Upload one local file under key atomically and streamed, never whole in memory (a local copy is
        renamed into place; s3fs uploads a large file in parts that S3 shows only once all are in). A local disk
        that fills up raises StoreFullError."""
        target = self.uri(key)
        if self.protocol == "file":
            _replace_atomically(target, os.path.getsize(local_file),
                                lambda temporary: shutil.copyfile(local_file, temporary))
        else:
            self.fs.put_file(str(local_file), target)

    def get_file(self, key: str, local_file: str | Path) -> Path:
        """Download the object at key into local_file, streamed, replacing it only once complete."""
        local_file = Path(local_file)
        local_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = local_file.with_name(f"{local_file.name}.{uuid.uuid4().hex}.tmp")
        try:
            self.fs.get_file(self.uri(key), str(temporary))
        except FileNotFoundError:
            raise FileNotFoundError(f"artifact {self.uri(key)} does not exist") from None
        os.replace(temporary, local_file)
        return local_file

    def put_folder(self, local_folder: str | Path, key: str, last: str | None = None) -> str:
        """Upload a local folder under key, file by file (put_file); the file named `last` (e.g. the digest that
        marks a checkpoint complete) is uploaded after all others. Returns the folder's URI."""
        local_folder = Path(local_folder)
        files = sorted(p for p in local_folder.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == last)
        for file in files:
            self.put_file(file, f"{key}/{file.relative_to(local_folder).as_posix()}")
        return self.uri(key)

    def get_folder(self, key: str, local_folder: str | Path) -> Path:
        """Download every file under key into a local folder (get_file); returns the folder."""
        local_folder = Path(local_folder)
        for file_key in self.list(key):
            self.get_file(file_key, local_folder / file_key[len(key):].lstrip("/"))
        return local_folder


def _warn_of_retries(http_response: Any, parsed: dict[str, Any], model: Any, **_: Any) -> None:
    """Say in the run's log that an S3 call was answered only after botocore's retries (throttling: 503 SlowDown,
    a 429 with a throttling code; or transient errors), so that a slow stage on a throttled bucket shows why."""
    retries = parsed.get("ResponseMetadata", {}).get("RetryAttempts", 0)
    if retries:
        log.warning("S3 %s %s answered %s after %d retries (throttled or transient errors; AWS_RETRY_MODE and "
                    "AWS_MAX_ATTEMPTS set how botocore retries)", model.name, http_response.url,
                    http_response.status_code, retries)


def _replace_atomically(target: str, needed: int, write: Callable[[str], object]) -> None:
    """Write a local file through write(temporary) beside target, then rename it over target; on any failure the
    temporary file is removed, and a full disk or quota raises StoreFullError."""
    temporary = f"{target}.{uuid.uuid4().hex}.tmp"
    try:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        os.replace(temporary, target)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(_existing_parent(target)).free
            raise StoreFullError(f"cannot write artifact {target}: {error.strerror} ({needed} bytes needed, {free} "
                                 "bytes free on its filesystem); free space and run again (what was written "
                                 "completely is kept, nothing was left half-written)") from None
        raise


def write_synced(path: str | Path, data: bytes) -> None:
    """Write `data` to the local file `path` and fsync it: on disk, whole, before the caller renames or links it."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _existing_parent(path: str) -> Path:
    parent = Path(path).parent
    while not parent.exists():
        parent = parent.parent
    return parent


def open_store(root: str) -> ArtifactStore:
    """The process's artifact store of a root: made once and handed out again (same filesystem object), as
    long as the S3 endpoint in the environment stays the same."""
    return _open_store(root, json.dumps(s3_storage_options(), sort_keys=True))


@cache
def _open_store(root: str, options: str) -> ArtifactStore:
    return ArtifactStore(root)
