"""Storage backends (local directory and a real local S3 server): round trips, atomicity, listing, key safety and
byte accounting (S3 reads fetch exactly the requested ranges: no read-ahead)."""

from __future__ import annotations

import os
import pickle
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from x2l.config import StoreConfig
from x2l.errors import CorruptionError, NotFoundError, StoreError
from x2l.store.backend import IOStats, LocalBackend, S3Backend, open_backend

MB = 2**20


@pytest.fixture
def backend(store_uri):
    return open_backend(store_uri)


def spy_s3_gets(backend, monkeypatch) -> list[int]:
    """Record the byte length of every GET the S3 client actually sends (from its Range header or the response)."""
    sizes: list[int] = []
    orig = backend.fs._call_s3

    async def spy(method, *args, **kwargs):
        out = await orig(method, *args, **kwargs)
        if method == "get_object":
            sizes.append(int(out["ContentLength"]))
        return out

    monkeypatch.setattr(backend.fs, "_call_s3", spy)
    return sizes


def test_open_backend_dispatch(tmp_path):
    assert isinstance(open_backend(str(tmp_path / "a")), LocalBackend)
    assert isinstance(open_backend(f"file://{tmp_path}/b"), LocalBackend)
    assert (tmp_path / "b").is_dir()
    assert isinstance(open_backend("s3://bucket/some/prefix"), S3Backend)
    with pytest.raises(StoreError, match="only s3://"):
        open_backend("gs://bucket/x")
    with pytest.raises(StoreError, match="no bucket"):
        open_backend("s3://")


def test_round_trip(backend):
    assert not backend.exists("v/one.bin")
    with pytest.raises(NotFoundError):
        backend.read_bytes("v/one.bin")
    with pytest.raises(NotFoundError):
        backend.size("v/one.bin")
    with pytest.raises(NotFoundError):
        backend.open_input("v/one.bin")
    data = os.urandom(10_000)
    before = backend.stats.snapshot()
    backend.write_bytes(backend.join("v", "one.bin"), data)
    assert backend.exists("v/one.bin") and backend.exists("v")
    assert backend.size("v/one.bin") == len(data)
    assert backend.read_bytes("v/one.bin") == data
    backend.write_bytes("v/one.bin", b"replaced")  # overwrite
    assert backend.read_bytes("v/one.bin") == b"replaced"
    backend.write_bytes("v/empty", b"")
    assert backend.read_bytes("v/empty") == b"" and backend.size("v/empty") == 0
    cost = backend.stats.snapshot() - before
    assert (cost.bytes_written, cost.write_requests) == (len(data) + 8, 3)
    assert (cost.bytes_read, cost.read_requests) == (len(data) + 8 + 0, 3)


def test_read_range(backend):
    data = bytes(range(256)) * 40
    backend.write_bytes("r/obj", data)
    assert backend.read_range("r/obj", 0, 10) == data[:10]
    assert backend.read_range("r/obj", 1000, 2345) == data[1000:3345]
    assert backend.read_range("r/obj", len(data) - 5, 5) == data[-5:]
    assert backend.read_range("r/obj", 7, 0) == b""
    with pytest.raises(StoreError, match="invalid byte range"):
        backend.read_range("r/obj", -1, 4)
    with pytest.raises(CorruptionError, match="truncated"):
        backend.read_range("r/obj", len(data) - 5, 6)  # runs past the end
    with pytest.raises(CorruptionError, match="truncated"):
        backend.read_range("r/obj", len(data) + 10, 4)  # starts past the end
    with pytest.raises(NotFoundError):
        backend.read_range("r/missing", 0, 4)


def test_open_output_is_atomic(backend):
    backend.write_bytes("a/obj", b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with backend.open_output("a/obj") as f:
            f.write(b"new bytes that must never be seen")
            assert backend.read_bytes("a/obj") == b"old"  # not visible before the block ends
            raise RuntimeError("boom")
    assert backend.read_bytes("a/obj") == b"old"
    with pytest.raises(RuntimeError):
        with backend.open_output("a/fresh") as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert not backend.exists("a/fresh")
    with backend.open_output("a/fresh") as f:  # streaming write in pieces
        for i in range(10):
            f.write(bytes([i]) * 1000)
        assert not backend.exists("a/fresh")
    assert backend.read_bytes("a/fresh") == b"".join(bytes([i]) * 1000 for i in range(10))
    if isinstance(backend, LocalBackend):  # no temp files left behind
        assert sorted(os.listdir(os.path.join(backend.root, "a"))) == ["fresh", "obj"]


def test_list_dirs(backend):
    assert backend.list_dirs("") == []
    assert backend.list_dirs("nothing/here") == []
    for key in ("vids/b/x", "vids/a/1/y", "vids/a/2/z", "vids/file", "top"):
        backend.write_bytes(key, b"x")
    assert backend.list_dirs("") == ["vids"]
    assert backend.list_dirs("vids") == ["a", "b"]
    assert backend.list_dirs("vids/") == ["a", "b"]
    assert backend.list_dirs("vids/a") == ["1", "2"]
    assert backend.list_dirs("vids/b") == []
    assert backend.list_dirs("vids/file") == []


def test_remove_prefix(backend):
    for key in ("v/a/x", "v/a/deep/y", "v/ab/z", "v/b"):
        backend.write_bytes(key, b"data")
    backend.remove_prefix("v/a")
    assert not backend.exists("v/a/x") and not backend.exists("v/a/deep/y") and not backend.exists("v/a")
    assert backend.read_bytes("v/ab/z") == b"data"  # a sibling sharing the name prefix survives
    assert backend.read_bytes("v/b") == b"data"
    assert backend.list_dirs("v") == ["ab"]
    backend.remove_prefix("v/a")  # nothing there: no error
    backend.remove_prefix("never/was")
    with pytest.raises(StoreError):
        backend.remove_prefix("")  # never the whole root
    backend.remove_prefix("v")
    assert backend.list_dirs("") == []


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../x", "a/./b", "a//b", "..", "a\\..\\b", ""])
def test_bad_keys_refused(backend, key):
    with pytest.raises(StoreError):
        backend.write_bytes(key, b"x")
    with pytest.raises(StoreError):
        backend.read_bytes(key)
    with pytest.raises(StoreError):
        backend.exists(key)


def test_local_keys_never_escape_root(tmp_path):
    b = LocalBackend(str(tmp_path / "root"))
    (tmp_path / "secret").write_bytes(b"s")
    with pytest.raises(StoreError):
        b.join("a", "..", "..", "secret")
    with pytest.raises(StoreError):
        b.read_bytes("../secret")
    with pytest.raises(StoreError):
        b.list_dirs("..")
    with pytest.raises(StoreError):
        b.remove_prefix("..")
    os.symlink(tmp_path, tmp_path / "root" / "link")  # a symlink inside the root pointing out of it
    with pytest.raises(StoreError, match="outside"):
        b.read_bytes("link/secret")
    with pytest.raises(StoreError, match="outside"):
        b.write_bytes("link/planted", b"x")
    assert not (tmp_path / "planted").exists() and (tmp_path / "secret").read_bytes() == b"s"
    assert b.join("a", "b/", "/c") == "a/b/c"


def test_small_range_of_big_object_counts_only_that_range(backend, monkeypatch):
    data = os.urandom(5 * MB)
    backend.write_bytes("big/obj", data)
    wire = spy_s3_gets(backend, monkeypatch) if isinstance(backend, S3Backend) else None

    before = backend.stats.snapshot()
    assert backend.read_range("big/obj", 2 * MB + 7, 100) == data[2 * MB + 7 : 2 * MB + 107]
    cost = backend.stats.snapshot() - before
    assert (cost.bytes_read, cost.read_requests) == (100, 1)

    before = backend.stats.snapshot()
    with backend.open_input("big/obj") as f:
        assert f.size() == len(data) and f.seekable()
        f.seek(3 * MB)
        assert f.read(100) == data[3 * MB : 3 * MB + 100]
        assert f.tell() == 3 * MB + 100
        buf = bytearray(50)
        assert f.readinto(buf) == 50 and bytes(buf) == data[3 * MB + 100 : 3 * MB + 150]
    cost = backend.stats.snapshot() - before
    assert (cost.bytes_read, cost.read_requests) == (150, 2)
    if wire is not None:  # what really crossed the wire: exactly those ranges, no read-ahead
        assert wire == [100, 100, 50]


def _write_parquet(backend, key, n_groups=5, rows_per_group=32_768):
    rng = np.random.default_rng(0)
    table = pa.table(
        {
            "a": rng.integers(0, 2**62, n_groups * rows_per_group),
            "b": rng.random(n_groups * rows_per_group),
        }
    )
    with backend.open_output(key) as f:  # a streaming writer over the sink
        with pq.ParquetWriter(f, table.schema, compression="none") as w:
            w.write_table(table, row_group_size=rows_per_group)
    return table


@pytest.mark.parametrize("pre_buffer", [True, False])
def test_parquet_row_group_read_counts_that_group_and_footer(backend, monkeypatch, pre_buffer):
    table = _write_parquet(backend, "pq/data.parquet")
    size = backend.size("pq/data.parquet")
    assert size > 2 * MB
    wire = spy_s3_gets(backend, monkeypatch) if isinstance(backend, S3Backend) else None

    before = backend.stats.snapshot()
    pf = pq.ParquetFile(backend.open_input("pq/data.parquet"), pre_buffer=pre_buffer)
    assert pf.metadata.num_row_groups == 5
    got = pf.read_row_group(2)
    pf.close()
    cost = backend.stats.snapshot() - before

    rg = pf.metadata.row_group(2)
    rg_bytes = sum(rg.column(i).total_compressed_size for i in range(rg.num_columns))
    footer_read = min(size, 64 * 1024)  # pyarrow reads the footer speculatively in one 64 KiB read
    assert got.equals(table.slice(2 * 32_768, 32_768))
    assert rg_bytes < size / 4
    assert rg_bytes <= cost.bytes_read <= rg_bytes + footer_read, (cost, rg_bytes, size)
    if wire is not None:
        assert sum(wire) == cost.bytes_read


def test_concurrent_reads_are_all_counted(backend):
    data = os.urandom(100_000)
    backend.write_bytes("c/obj", data)
    before = backend.stats.snapshot()

    def work(i):
        assert backend.read_range("c/obj", i * 100, 100) == data[i * 100 : i * 100 + 100]
        with backend.open_input("c/obj") as f:
            f.seek(i * 7)
            assert f.read(10) == data[i * 7 : i * 7 + 10]

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(64)))
    cost = backend.stats.snapshot() - before
    assert (cost.bytes_read, cost.read_requests) == (64 * 110, 128)


def test_iostats_snapshot_sub_pickle():
    s = IOStats()
    s.add_read(10)
    snap = s.snapshot()
    s.add_read(5)
    s.add_write(7)
    assert s - snap == IOStats(5, 1, 7, 1)
    assert snap == IOStats(10, 1, 0, 0)  # a snapshot does not move
    t = pickle.loads(pickle.dumps(s))
    t.add_read(1)
    assert (t.bytes_read, t.read_requests, t.bytes_written) == (16, 3, 7)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once closed


def test_unreachable_s3_is_a_quick_store_error(monkeypatch):
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    cfg = StoreConfig(uri="s3://x2l/p", endpoint_url=endpoint, access_key="k", secret_key="s", region="us-east-1")
    b = open_backend(
        cfg.uri,
        cfg,
        fs_options={"config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"total_max_attempts": 1}}},
    )
    for op in (
        lambda: b.read_bytes("x"),
        lambda: b.write_bytes("x", b"1"),
        lambda: b.list_dirs(""),
        lambda: b.exists("x"),
        lambda: b.open_input("x"),
    ):
        with pytest.raises(StoreError, match=r"store s3://x2l/p unreachable at http://127\.0\.0\.1:\d+") as e:
            op()
        assert not isinstance(e.value, NotFoundError)
    # quick because of how the client is configured (one attempt, a 1 s connect timeout), not a wall-clock bound
    client = b.fs.s3.meta.config
    assert client.retries["total_max_attempts"] == 1  # s3fs does not retry a refused connection on its own
    assert client.connect_timeout == 1 and client.read_timeout == 1


def test_s3_credentials_are_enforced(s3_server, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    uri = s3_server.uri("creds")
    good = StoreConfig(
        uri=uri,
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region="us-east-1",
    )
    open_backend(uri, good).write_bytes("obj", b"ok")
    for key, secret in ((s3_server.access_key, "wrong-secret"), ("nobody", "nothing")):
        bad = StoreConfig(
            uri=uri, endpoint_url=s3_server.endpoint_url, access_key=key, secret_key=secret, region="us-east-1"
        )
        with pytest.raises(StoreError, match="refused access"):
            open_backend(uri, bad).read_bytes("obj")
    anon = open_backend(
        uri,
        None,
        fs_options={
            "anon": True,
            "key": None,
            "secret": None,
            "client_kwargs": {"endpoint_url": s3_server.endpoint_url},
        },
    )
    with pytest.raises(StoreError, match="refused access"):
        anon.read_bytes("obj")
    assert open_backend(uri, good).read_bytes("obj") == b"ok"


def test_list_files_lists_objects_not_directories(store_uri):
    from x2l.store.backend import open_backend

    b = open_backend(store_uri)
    b.write_bytes("d/one.txt", b"1")
    b.write_bytes("d/two.txt", b"2")
    b.write_bytes("d/sub/three.txt", b"3")
    assert b.list_files("d") == ["one.txt", "two.txt"]
    assert b.list_dirs("d") == ["sub"]
    assert b.list_files("missing") == []


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _gone(pid: int) -> bool:
    """Whether pid has exited (a zombie counts as exited: it waits only for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_gone(pid: int, within_s: float = 60.0) -> bool:
    import time

    deadline = time.monotonic() + within_s  # a safety net against a hung test, not a speed claim
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("killed", ["server", "its parent"])
def test_make_s3_server_dies_with_its_parent_even_when_killed(tmp_path, killed):
    """`make s3` (python -m x2l.testing.s3_server) prints the variables to export; weed runs in a session of its own,
    so when the server is SIGKILLed, or the process that started it (make) is, the kernel ends it (issue 14 review)."""
    import signal
    import subprocess
    import sys

    from x2l.testing.s3_server import weed_binary

    parent = subprocess.Popen(  # stands in for make: starts the server, then waits
        [sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])"]
        + [sys.executable, "-m", "x2l.testing.s3_server", "--dir", str(tmp_path / "s3")],
        stdout=subprocess.PIPE,
        text=True,
    )
    started: list[int] = []
    try:
        lines = [parent.stdout.readline() for _ in range(7)]
        assert lines[0].startswith("S3 ready at http://127.0.0.1:")
        assert [line.split("=")[0] for line in lines[1:6]] == [
            "export AWS_ENDPOINT_URL_S3",
            "export AWS_ENDPOINT_URL",
            "export AWS_ACCESS_KEY_ID",
            "export AWS_SECRET_ACCESS_KEY",
            "export AWS_REGION",
        ]
        (server,) = _children(parent.pid)
        (weed,) = _children(server)
        started += [server, weed]
        with open(f"/proc/{weed}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[0] == weed_binary().encode()
        os.kill(server if killed == "server" else parent.pid, signal.SIGKILL)
        assert _wait_gone(weed) and _wait_gone(server)
    finally:
        for pid in [parent.pid, *started]:  # what a failure left running (this test's own processes only)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        parent.wait()
