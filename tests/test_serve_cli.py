"""`x2l serve` (issue 13): start, ready, answer over HTTP, stop on a signal, on a real local Ray in a subprocess."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from x2l.config import RetrievalConfig, SamplingConfig
from x2l.engine import Answerer, Indexer, Question
from x2l.store import KVStore
from x2l.testing.videos import write_video

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_checkpoints):
    from x2l.models import load_model

    root = tmp_path_factory.mktemp("serve_cli")
    model_dir = tiny_checkpoints["qwen2-vl"]
    model = load_model(model_dir)
    store = KVStore(str(root / "store"), model.fingerprint)
    path = write_video(root / "cats.mp4", n_frames=24, fps=4, size=(64, 96))
    store.write(Indexer(model, SamplingConfig(fps=2, frames_per_chunk=4)).index(path, "cats.mp4").video)
    return {"store": str(root / "store"), "model": str(model_dir), "model_obj": model}


def x2l(*args: str) -> list[str]:
    return [sys.executable, "-m", "x2l.cli", *args]


def env() -> dict:
    from x2l.testing.ray_head import loopback_env

    return loopback_env()


def test_options_are_serve_args_fields_with_its_defaults():
    from x2l.serve import ServeArgs
    from x2l.serve_cli import OPTIONS

    defaults = {name: f.default for name, f in ServeArgs.model_fields.items()}
    assert set(OPTIONS) == set(defaults) - {"store", "model"}
    assert {k: d for k, (d, _) in OPTIONS.items()} == {k: defaults[k] for k in OPTIONS}


def test_bad_model_store_or_port_is_one_line_before_ray_starts(indexed, tmp_path):
    cases = [
        (
            [indexed["store"], "--model", str(tmp_path / "nomodel")],
            f"x2l: error: model directory {tmp_path / 'nomodel'} does not exist",
        ),
        (
            [str(tmp_path / "nostore"), "--model", indexed["model"]],
            f"x2l: error: store={tmp_path / 'nostore'}: store {tmp_path / 'nostore'} does not exist",
        ),
        (
            [indexed["store"], "--model", indexed["model"], "--max-batch-size", "0"],
            "x2l: error: x2l.serve argument max_batch_size=0: must be >= 1",
        ),
        (
            [indexed["store"], "--model", indexed["model"], "--port", "70000"],
            "x2l: error: --port 70000: not a TCP port (1-65535)",
        ),
        (
            [indexed["store"], "--model", indexed["model"], "--port", "0"],
            "x2l: error: --port 0: not a TCP port (1-65535)",
        ),
        (
            [indexed["store"], "--model", indexed["model"], "--startup-timeout", "0"],
            "x2l: error: --startup-timeout 0: must be > 0 seconds",
        ),
        (  # given both, even when --num-replicas is the default's value
            [indexed["store"], "--model", indexed["model"], "--num-replicas", "1"]
            + ["--autoscaling-config", '{"min_replicas": 1, "max_replicas": 2}'],
            "x2l: error: x2l.serve arguments: give num_replicas or autoscaling_config, not both (autoscaling_config "
            "sets min/max_replicas)",
        ),
    ]
    for args, line in cases:
        r = subprocess.run(x2l("serve", *args), capture_output=True, text=True, env=env(), cwd=tmp_path)
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip().splitlines() == [line] and r.stdout == ""
    assert not (tmp_path / "nostore").exists()
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            x2l("serve", indexed["store"], "--model", indexed["model"], "--port", str(port)),
            capture_output=True,
            text=True,
            env=env(),
            cwd=tmp_path,
        )
    assert r.returncode == 1
    [line] = r.stderr.strip().splitlines()
    assert line.startswith(f"x2l: error: --host 127.0.0.1 --port {port}: cannot listen there")


def test_port_left_in_time_wait_by_a_stopped_server_is_free():
    """A port whose last server stopped moments ago has connections in TIME_WAIT: Serve's HTTP proxy (uvicorn,
    SO_REUSEADDR) can listen there, so the pre-check must not refuse it; a port someone listens on still is."""
    import socket

    from x2l.errors import ConfigError
    from x2l.serve_cli import check_port

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server side closes first: its end of the connection stays in TIME_WAIT on `port`
    server.close()
    client.close()
    check_port("127.0.0.1", port)
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ConfigError, match="cannot listen there"):
            check_port("127.0.0.1", busy.getsockname()[1])


def _descendants(pid: int) -> dict[int, bytes]:
    """Every live process under `pid` (by parent links), with its command line."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        try:
            out[p] = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        todo.extend(children.get(p, []))
    return out


def _alive(pid: int, cmdline: bytes) -> bool:
    """The same process (same command line) still exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline
    except OSError:
        return False


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_serve_starts_answers_and_stops_with_its_ray(indexed, tmp_path, sig, code):
    from x2l.testing.ray_head import free_port

    port = free_port()
    proc = subprocess.Popen(
        x2l(
            "serve",
            indexed["store"],
            "--model",
            indexed["model"],
            "--port",
            str(port),
            "--num-cpus",
            "0.2",
            "--max-batch-size",
            "4",
            "--torch-threads",
            "1",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=tmp_path,
    )
    try:
        url = proc.stdout.readline().strip()  # printed once GET /readyz answered 200
        assert url == f"http://127.0.0.1:{port}", proc.stderr.read() if proc.poll() is not None else url
        assert httpx.get(url + "/readyz").status_code == 200
        question = {"video_id": "cats.mp4", "question": "What color is the cat?"}
        r = httpx.post(url + "/v1/answer", json={"questions": [question]}, timeout=120)
        assert r.status_code == 200
        [got] = r.json()["answers"]
        answerer = Answerer(
            indexed["model_obj"], KVStore(indexed["store"]), RetrievalConfig(top_k=3, max_new_tokens=32)
        )
        [want] = answerer.answer([Question("cats.mp4", question["question"])])
        assert got["answer"] == want.text and got["selected_chunks"] == want.selected_chunks
        ray_procs = _descendants(proc.pid)
        names = b" ".join(ray_procs.values())
        assert b"gcs_server" in names and b"raylet" in names  # the Ray it started runs under it
    finally:
        if proc.poll() is None:
            proc.send_signal(sig)
        rc = proc.wait(timeout=300)
    err = proc.stderr.read()
    assert rc == code, err
    temp_dir = re.search(r"temp dir (\S+)\)", err).group(1)
    assert not Path(temp_dir).exists()
    assert [p for p, cmd in ray_procs.items() if _alive(p, cmd)] == []
    assert "Traceback" not in err
