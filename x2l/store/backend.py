"""Byte storage behind one small interface: a local directory or an S3 prefix, chosen by URI.

Keys are relative, "/"-separated paths under the backend's root ("videos/abc/l.parquet"). Every byte that leaves
storage or is written to it is counted in `backend.stats` (thread-safe), so callers can measure what one
operation cost: `before = b.stats.snapshot(); ...; cost = b.stats.snapshot() - before`.

Writes are atomic: a reader sees the old object or the whole new one, never a part, and a write whose block
raises leaves nothing behind. S3 reads fetch exactly the requested ranges (no read-ahead), so `bytes_read` is
what crossed the wire.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO

from x2l.config import StoreConfig
from x2l.errors import CorruptionError, NotFoundError, StoreError


@dataclass
class IOStats:
    """Byte accounting of one backend. Counters only grow; subtract snapshots to measure an operation.

    bytes_read / read_requests: bytes fetched from storage and the number of fetches (one per read call that
    returned data). bytes_written / write_requests: bytes of committed objects and the number of objects.
    """

    bytes_read: int = 0
    read_requests: int = 0
    bytes_written: int = 0
    write_requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def add_read(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes
            self.read_requests += 1

    def add_write(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_written += nbytes
            self.write_requests += 1

    def snapshot(self) -> IOStats:
        with self._lock:
            return IOStats(self.bytes_read, self.read_requests, self.bytes_written, self.write_requests)

    def __sub__(self, other: IOStats) -> IOStats:
        a, b = self.snapshot(), other.snapshot()
        return IOStats(
            a.bytes_read - b.bytes_read,
            a.read_requests - b.read_requests,
            a.bytes_written - b.bytes_written,
            a.write_requests - b.write_requests,
        )

    def __getstate__(self) -> dict:  # picklable (e.g. shipped to Ray workers); the lock is recreated
        s = self.snapshot()
        return {k: getattr(s, k) for k in ("bytes_read", "read_requests", "bytes_written", "write_requests")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class CountingFile:
    """A seekable, read-only binary file that counts every read into an IOStats.

    Wraps a raw file (local `open(..., "rb")` or an s3fs file opened with cache_type="none", where each read is
    one ranged GET of exactly the bytes asked for). Works as the source of pyarrow.parquet.ParquetFile (pre_buffer
    on or off). One file has one position: open one per reading thread (the stats may be shared).
    """

    def __init__(self, raw, stats: IOStats, size: int, name: str, errors: Callable[[], ContextManager]):
        self.raw, self.stats, self._size, self.name, self._errors = raw, stats, size, name, errors

    def read(self, n: int = -1) -> bytes:
        with self._errors():
            data = self.raw.read(n)
        if data:
            self.stats.add_read(len(data))
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(memoryview(buf)))
        memoryview(buf).cast("B")[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def size(self) -> int:
        return self._size

    def close(self) -> None:
        self.raw.close()

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def __enter__(self) -> CountingFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CountingFile({self.name!r})"


class _Sink:
    """What open_output yields: a write-only stream into a temp file. close() is left to the backend (pyarrow's
    ParquetWriter closes its sink), so the commit happens when the with-block ends."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.nbytes, self.closed = raw, 0, False

    def write(self, data) -> int:
        n = self.raw.write(data)
        self.nbytes += n
        return n

    def tell(self) -> int:
        return self.nbytes

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False


@contextmanager
def _spool(raw: BinaryIO, fsync: bool) -> Iterator[_Sink]:
    """Yield a sink writing into raw; raw is complete (and fsynced if asked) and closed when this exits."""
    with raw:
        sink = _Sink(raw)
        yield sink
        raw.flush()
        if fsync:
            os.fsync(raw.fileno())


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError):  # never created (its folder could not be: a file is in the way)
        pass


def _empty_range(start: int, length: int) -> bool:
    if start < 0 or length < 0:
        raise StoreError(f"invalid byte range: start={start}, length={length}")
    return length == 0


def _check_key(key: str, allow_empty: bool = False) -> str:
    """Keys are relative "/"-separated paths without "."/".." or empty components; a trailing "/" is dropped."""
    if not isinstance(key, str):
        raise StoreError(f"store key must be a string, got {type(key).__name__}")
    key = key.rstrip("/") if key != "/" else key
    if not key:
        if allow_empty:
            return key
        raise StoreError("empty store key")
    if key.startswith("/") or "\\" in key or "\0" in key:
        raise StoreError(f"store key {key!r} must be a relative '/'-separated path")
    if any(p in ("", ".", "..") for p in key.split("/")):
        raise StoreError(f"store key {key!r} has an empty, '.' or '..' component")
    return key


@dataclass(frozen=True)
class FileEntry:
    """One object as listed: its name under the listed prefix, size in bytes, last modification (Unix seconds)."""

    name: str
    size: int
    mtime: float


class Backend(ABC):
    """Objects under one root (a directory or an s3://bucket/prefix), addressed by relative keys."""

    uri: str
    stats: IOStats

    def __init__(self, uri: str):
        self.uri = uri
        self.stats = IOStats()

    def join(self, *parts: str) -> str:
        """A key from parts ("a", "b/c" -> "a/b/c"); refuses "..", absolute or empty results."""
        return _check_key("/".join(p.strip("/") for p in parts if p))

    def where(self, key: str) -> str:
        """The full address of a key, for messages."""
        return f"{self.uri.rstrip('/')}/{key}"

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The whole object. NotFoundError if missing."""

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Exactly `length` bytes from `start`; CorruptionError if the object ends first (it is truncated)."""

    @abstractmethod
    def open_input(self, key: str) -> CountingFile:
        """A seekable file for pyarrow.parquet.ParquetFile; every read is counted (and on S3 is one ranged GET)."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Object size in bytes. NotFoundError if missing."""

    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomically replace (or create) an object."""
        with self.open_output(key) as f:
            f.write(data)

    @abstractmethod
    def open_output(self, key: str) -> ContextManager[BinaryIO]:
        """Streaming write; the object appears (atomically) when the block exits normally, never if it raises."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object (or a non-empty directory) exists at key."""

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Sorted names of the immediate child directories under prefix ("" = root); [] if there are none."""
        return self._children(prefix, dirs=True)

    def list_files(self, prefix: str = "") -> list[str]:
        """Sorted names of the immediate child objects (files) under prefix; [] if there are none."""
        return self._children(prefix, dirs=False)

    @abstractmethod
    def _children(self, prefix: str, dirs: bool) -> list[str]:
        """Names of the immediate children under prefix that are directories (dirs) or files (not dirs)."""

    @abstractmethod
    def remove_prefix(self, prefix: str) -> None:
        """Remove everything under prefix/ (and an object named prefix); no error if nothing is there."""

    @abstractmethod
    def list_entries(self, prefix: str = "") -> list[FileEntry]:
        """Every object directly under prefix, writes in flight (local `.tmp-` files) included, with size and age;
        sorted by name; [] if there are none. For `x2l store verify` / `gc`."""

    @abstractmethod
    def remove(self, key: str) -> None:
        """Remove one object; no error if it is not there."""

    def remove_empty_dir(self, prefix: str) -> None:  # noqa: B027 - an optional hook; folders-free backends skip it
        """Remove the folder prefix if it is empty (a no-op where folders are only key prefixes, as on S3)."""

    def _check_read(self, key: str, start: int, length: int, data: bytes) -> bytes:
        if len(data) != length:
            raise CorruptionError(
                f"{self.where(key)} is truncated: wanted bytes [{start}, {start + length}), got {len(data)}"
            )
        return data

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class LocalBackend(Backend):
    """A directory (created if missing, unless create=False: then a missing one is a NotFoundError, so read-only
    commands never create folders). Writes go to a hidden temp file in the target's directory, fsynced, then
    os.replace'd into place."""

    def __init__(self, root: str, create: bool = True):
        root = root[len("file://") :] if root.startswith("file://") else root
        self.root = os.path.realpath(os.path.expanduser(root))
        if not create:
            if not os.path.isdir(self.root):
                raise NotFoundError(f"store {self.root} does not exist")
            super().__init__(self.root)
            return
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise StoreError(f"store {self.root} cannot be created: {e}") from e
        super().__init__(self.root)

    def _path(self, key: str, allow_empty: bool = False) -> str:
        key = _check_key(key, allow_empty)
        path = os.path.join(self.root, *key.split("/")) if key else self.root
        real = os.path.realpath(path)
        if real != self.root and not real.startswith(self.root + os.sep):
            raise StoreError(f"store key {key!r} resolves outside {self.root}")
        return path

    @contextmanager
    def _errors(self, key: str = "") -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise NotFoundError(f"{self.where(key)} not found") from e
        except OSError as e:
            raise StoreError(f"store {self.uri}: {e}") from e

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        with self._errors(key), open(path, "rb") as f:
            data = f.read()
        self.stats.add_read(len(data))
        return data

    def read_range(self, key: str, start: int, length: int) -> bytes:
        path = self._path(key)
        if _empty_range(start, length):
            return b""
        with self._errors(key), open(path, "rb") as f:
            f.seek(start)
            data = f.read(length)
        if data:
            self.stats.add_read(len(data))
        return self._check_read(key, start, length, data)

    def open_input(self, key: str) -> CountingFile:
        path = self._path(key)
        with self._errors(key):
            raw = open(path, "rb")
            size = os.fstat(raw.fileno()).st_size
        return CountingFile(raw, self.stats, size, self.where(key), lambda: self._errors(key))

    def size(self, key: str) -> int:
        path = self._path(key)
        with self._errors(key):
            return os.stat(path).st_size

    @contextmanager
    def open_output(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with self._errors(key):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                raw = open(tmp, "xb")
            with _spool(raw, fsync=True) as sink:
                yield sink
            with self._errors(key):
                os.replace(tmp, path)
        finally:
            _unlink_quiet(tmp)  # no-op after a successful replace
        self.stats.add_write(sink.nbytes)

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def _children(self, prefix: str, dirs: bool) -> list[str]:
        path = self._path(prefix, allow_empty=True)
        try:
            return sorted(
                e.name for e in os.scandir(path) if (e.is_dir() if dirs else e.is_file()) and ".tmp-" not in e.name
            )  # skip writes in flight
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove_prefix(self, prefix: str) -> None:
        path = self._path(prefix)  # a non-empty prefix: never the whole root
        with self._errors(prefix):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)

    def list_entries(self, prefix: str = "") -> list[FileEntry]:
        path = self._path(prefix, allow_empty=True)
        out = []
        try:
            for e in os.scandir(path):
                try:
                    if e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        out.append(FileEntry(e.name, st.st_size, st.st_mtime))
                except FileNotFoundError:  # removed while listing (a write finished)
                    continue
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(out, key=lambda f: f.name)

    def remove(self, key: str) -> None:
        path = self._path(key)
        with self._errors(key):
            _unlink_quiet(path)

    def remove_empty_dir(self, prefix: str) -> None:
        try:
            os.rmdir(self._path(prefix))
        except OSError:  # not empty (a writer got there first) or already gone
            pass


class S3Backend(Backend):
    """An s3://bucket/prefix over s3fs. Reads use cache_type="none" (no read-ahead): each read is one ranged GET of
    exactly the requested bytes. Writes are spooled to a local temp file and uploaded in one PUT (or a multipart
    upload, which is aborted on failure) when the block ends, so an object appears whole or not at all.

    fs_options override s3fs.S3FileSystem arguments (e.g. {"config_kwargs": {"connect_timeout": 2}}).
    """

    def __init__(self, uri: str, config: StoreConfig | None = None, fs_options: dict | None = None):
        import s3fs

        root = uri[len("s3://") :].strip("/")
        if not root or root.startswith("/"):
            raise StoreError(f"store uri {uri!r} has no bucket (expected s3://bucket/prefix)")
        super().__init__(f"s3://{root}")
        self.root = root
        opts = (config or StoreConfig(uri=uri)).resolved_s3_options()
        # Listings are never cached (other processes write too); each backend gets its own client.
        opts.update(use_listings_cache=False, skip_instance_cache=True)
        opts.update(copy.deepcopy(fs_options or {}))  # botocore mutates nested config dicts
        self.endpoint = opts.get("client_kwargs", {}).get("endpoint_url") or "the default AWS endpoint"
        self.fs = s3fs.S3FileSystem(**opts)

    def _path(self, key: str, allow_empty: bool = False) -> str:
        key = _check_key(key, allow_empty)
        return f"{self.root}/{key}" if key else self.root

    @contextmanager
    def _errors(self, key: str = "") -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, HTTPClientError, NoCredentialsError
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from fsspec.exceptions import FSTimeoutError

        try:
            yield
        except StoreError:
            raise
        except FileNotFoundError as e:
            raise NotFoundError(f"{self.where(key)} not found ({e})") from e
        except PermissionError as e:
            raise StoreError(
                f"store {self.uri} refused access at {self.endpoint}: {e} "
                "(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
            ) from e
        except (
            BotoConnectionError,
            HTTPClientError,
            NoCredentialsError,
            FSTimeoutError,
            TimeoutError,
            ConnectionError,
        ) as e:
            raise StoreError(f"store {self.uri} unreachable at {self.endpoint}: {e}") from e
        except (BotoCoreError, OSError) as e:
            raise StoreError(f"store {self.uri}: {self.where(key)}: {e}") from e

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        with self._errors(key):
            data = self.fs.cat_file(path)
        self.stats.add_read(len(data))
        return data

    def read_range(self, key: str, start: int, length: int) -> bytes:
        path = self._path(key)
        if _empty_range(start, length):
            return b""
        with self._errors(key):
            try:
                data = self.fs.cat_file(path, start=start, end=start + length)
            except OSError as e:
                if "range is not satisfiable" not in str(e):  # starts at or past the end: truncated
                    raise
                data = b""
        if data:
            self.stats.add_read(len(data))
        return self._check_read(key, start, length, data)

    def open_input(self, key: str) -> CountingFile:
        path = self._path(key)
        with self._errors(key):
            raw = self.fs.open(path, "rb", cache_type="none")
        return CountingFile(raw, self.stats, raw.size, self.where(key), lambda: self._errors(key))

    def size(self, key: str) -> int:
        path = self._path(key)
        with self._errors(key):
            info = self.fs.info(path)
        if info.get("type") != "file":
            raise NotFoundError(f"{self.where(key)} not found (it is a directory)")
        return int(info["size"])

    @contextmanager
    def open_output(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        fd, tmp = tempfile.mkstemp(prefix="x2l-upload-")
        try:
            with _spool(os.fdopen(fd, "wb"), fsync=False) as sink:
                yield sink
            with self._errors(key):
                self.fs.put_file(tmp, path)
        finally:
            _unlink_quiet(tmp)
        self.stats.add_write(sink.nbytes)

    def exists(self, key: str) -> bool:
        path = self._path(key)
        with self._errors(key):
            return self.fs.exists(path)

    def _ls(self, prefix: str) -> list[dict]:
        """s3fs's detailed listing of one level under prefix (fresh, not its cache); [] when nothing is there."""
        path = self._path(prefix, allow_empty=True)
        with self._errors(prefix):
            try:
                return self.fs.ls(path, detail=True, refresh=True)
            except FileNotFoundError:
                return []

    def _children(self, prefix: str, dirs: bool) -> list[str]:
        entries = self._ls(prefix)
        kind = "directory" if dirs else "file"
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == kind)

    def remove_prefix(self, prefix: str) -> None:
        path = self._path(prefix)  # a non-empty prefix: never the bucket itself
        with self._errors(prefix):
            entries = self.fs.find(path, withdirs=True, detail=True)
            files = [name for name, e in entries.items() if e["type"] == "file"]
            if files:
                self.fs.rm(files)
            # Filer-backed servers (SeaweedFS) keep emptied directories, and list them as common prefixes, until a
            # background sweep minutes later; delete their "dir/" entries, deepest first. A no-op on AWS S3.
            dirs = sorted((n for n, e in entries.items() if e["type"] == "directory"), key=len, reverse=True)
            for name in dirs:
                bucket, key, _ = self.fs.split_path(name)
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key + "/")

    def list_entries(self, prefix: str = "") -> list[FileEntry]:
        entries = self._ls(prefix)
        out = []
        for e in entries:
            if e["type"] != "file":
                continue
            modified = e.get("LastModified")
            # No modification time listed: count the object as new, so gc never collects it early.
            out.append(
                FileEntry(
                    e["name"].rstrip("/").rsplit("/", 1)[-1],
                    int(e.get("size", 0)),
                    modified.timestamp() if modified is not None else time.time(),
                )
            )
        return sorted(out, key=lambda f: f.name)

    def remove(self, key: str) -> None:
        path = self._path(key)
        with self._errors(key):
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass


def open_backend(
    uri: str, config: StoreConfig | None = None, fs_options: dict | None = None, create: bool = True
) -> Backend:
    """s3://bucket/prefix -> S3Backend (credentials/endpoint from config, else the AWS environment); a path or
    file://path -> LocalBackend (create=False: NotFoundError if the folder does not exist, nothing created).
    fs_options: extra s3fs.S3FileSystem arguments (S3 only)."""
    if uri.startswith("s3://"):
        return S3Backend(uri, config, fs_options)
    if "://" in uri and not uri.startswith("file://"):
        raise StoreError(f"store uri {uri!r}: only s3:// and local paths are supported")
    return LocalBackend(uri, create)
