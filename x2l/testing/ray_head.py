"""A throwaway single-node Ray head on 127.0.0.1 (`ray start --head --block`), for the demo and the tests.

Everything binds to loopback: `--node-ip-address=127.0.0.1` and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (without it Ray's
agents bind the address of the default route). Token authentication is on with a fresh random token that only
`env()` carries (Ray would otherwise turn it on or off depending on whether ~/.ray/auth_token happens to exist). Its
`ray start` runs in a session of its own, which is how `stop()` finds the processes this head started and ends
exactly those, by PID.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env(base: dict | None = None) -> dict:
    """Environment for Ray processes and clients: loopback only, this interpreter's bin first on PATH (so a job's
    `python` is the one x2l is installed in)."""
    env = dict(os.environ if base is None else base) | LOOPBACK_ENV
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class LocalRayHead:
    def __init__(self, num_cpus: int = 2, start_timeout: float = 90.0):
        self.num_cpus = num_cpus
        self.start_timeout = start_timeout
        self.temp_dir = tempfile.mkdtemp(prefix="x2lray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.agent_port = free_port()  # the job agent's HTTP port (Ray's fixed default 52365 could be taken)
        self.token = secrets.token_hex(32)
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """For `ray.init(address=...)`."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """For `ray job submit --address ...`."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict:
        """Environment for clients of this head (`ray job submit`, `ray.init`)."""
        return loopback_env() | {
            "RAY_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
        }

    def start(self) -> LocalRayHead:
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={self.agent_port}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        log = open(Path(self.temp_dir) / "head.log", "w")
        env = self.env()
        del env["RAY_ADDRESS"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited ({self.proc.returncode}): {self.log_tail()}")
            if self._listening(self.dashboard_port) and self._listening(self.agent_port):
                return self  # the dashboard answers and the job agent that runs submitted jobs is up
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ray head did not answer within {self.start_timeout:.0f} s: {self.log_tail()}")

    @staticmethod
    def _listening(port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def log_tail(self, n: int = 20) -> str:
        path = Path(self.temp_dir) / "head.log"
        return "\n".join(path.read_text().splitlines()[-n:]) if path.exists() else ""

    def _our_pids(self) -> list[int]:
        """Processes of the session our `ray start` leads (Ray renames its processes, "ray::DashboardAgent", so
        command lines cannot be trusted), plus any whose command line names our temp dir."""
        session = self.proc.pid if self.proc else None
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = (entry / "stat").read_text()
                sid = int(stat.rsplit(")", 1)[1].split()[3])
                if sid == session or self.temp_dir.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
        return pids

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the head and every process started under our temp dir, SIGKILL what is left after `grace`."""
        pids = set(self._our_pids()) | ({self.proc.pid} if self.proc else set())
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (self._our_pids() or (self.proc and self.proc.poll() is None)):
            time.sleep(0.25)
        for pid in set(self._our_pids()) | ({self.proc.pid} if self.proc and self.proc.poll() is None else set()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc:
            self.proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
