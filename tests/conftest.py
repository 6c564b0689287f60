"""Shared fixtures.

s3_server  (session): one real local S3 server (SeaweedFS `weed mini` on 127.0.0.1, started once, stopped at the end
           of the session). Use .uri(prefix), .env(), .endpoint_url, .access_key / .secret_key.
store_uri  (function, parametrised "local" / "s3"): a fresh, empty store URI per test — a tmp directory, or
           s3://x2l/<unique prefix> with the AWS_* variables pointing at s3_server set for the test (monkeypatch),
           so open_backend(store_uri) / StoreConfig(uri=store_uri) reach it with no further arguments. The S3 server
           is only started when an "s3" case runs (pytest -k local avoids it).
"""

from __future__ import annotations

import os
import uuid

# In-process Ray clusters (ray.init(address="local")) bind loopback only and skip token auth (which would otherwise
# write ~/.ray/auth_token); the `ray_head` fixture's processes get their own token through LocalRayHead.env().
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest

from x2l.testing.s3_server import LocalS3Server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    with LocalS3Server(str(tmp_path_factory.mktemp("s3"))) as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path, monkeypatch):
    if request.param == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    for var, value in server.env().items():
        monkeypatch.setenv(var, value)
    return server.uri(f"t-{uuid.uuid4().hex[:12]}")


# --- models and videos ------------------------------------------------------------------------------------------------
# tiny_checkpoints (session): {family name: dir} for every registered family (FAMILY_NAMES), random tiny
#                   checkpoints written by each family's tiny builder (x2l.models.registry).
# video_path (session): a 10 s, 2 fps-sampled, 64x96 H.264 test video written with PyAV.


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    from x2l.models.registry import FAMILY_NAMES, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {fam: write_tiny_checkpoint(root / fam, fam, size="tiny") for fam in FAMILY_NAMES}


@pytest.fixture(scope="session")
def video_path(tmp_path_factory):
    from x2l.testing.videos import write_video

    return write_video(tmp_path_factory.mktemp("videos") / "clip.mp4", n_frames=50, fps=5, size=(64, 96))


# --- Ray --------------------------------------------------------------------------------------------------------------
# ray_head (session): a real single-node Ray head (`ray start --head`) on 127.0.0.1 with 2 CPUs, stopped at the end.
# Submit with `ray job submit --address ray_head.dashboard_url ...` and env=ray_head.env().


@pytest.fixture(scope="session")
def ray_head():
    from x2l.testing.ray_head import LocalRayHead

    with LocalRayHead(num_cpus=2) as head:
        yield head
