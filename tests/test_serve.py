"""The Ray Serve query tier and the bulk answering job, on a real local Ray with a real indexed store."""

from __future__ import annotations

import collections
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from x2l.config import RetrievalConfig, SamplingConfig
from x2l.engine import Answerer, Indexer, Question
from x2l.store import KVStore
from x2l.testing.videos import write_video

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = {"cats.mp4": 32, "dogs.mp4": 40, "birds.mp4": 24, "fish.mp4": 48}  # frames at 4 fps, sampled at 2 fps
SAMPLING = SamplingConfig(fps=2, frames_per_chunk=4)
TOKEN_ENV = "X2L_TEST_API_TOKEN"


@pytest.fixture(scope="module")
def archive(tmp_path_factory, tiny_checkpoints):
    """Four indexed videos in a local store, and the model directory that indexed them."""
    from x2l.models import load_model

    root = tmp_path_factory.mktemp("archive")
    model_dir = tiny_checkpoints["qwen2-vl"]
    model = load_model(model_dir)
    store = KVStore(str(root / "store"), model.fingerprint)
    for i, (name, frames) in enumerate(VIDEOS.items()):
        path = write_video(root / name, n_frames=frames, fps=4, size=(64, 96 + 28 * i))
        store.write(Indexer(model, SAMPLING).index(path, name).video)
    # a store of its own for the re-index test: one video, indexed in chunks of 4 frames
    live = write_video(root / "live.mp4", n_frames=32, fps=4, size=(64, 96))
    KVStore(str(root / "live"), model.fingerprint).write(Indexer(model, SAMPLING).index(live, "live.mp4").video)
    return {
        "store": str(root / "store"),
        "model": str(model_dir),
        "model_obj": model,
        "live": str(root / "live"),
        "live_video": live,
    }


@pytest.fixture(scope="module")
def damaged_store(archive, tmp_path_factory) -> str:
    """A copy of the archive's store where birds.mp4 has a truncated KV file and fish.mp4 an invalid meta.json."""
    import shutil

    from x2l.store.keys import meta_path

    root = tmp_path_factory.mktemp("damaged")
    shutil.copytree(archive["store"], root / "store")
    store = KVStore(str(root / "store"))
    birds = store.committed("birds.mp4")
    kv = root / "store" / "videos" / birds["video_key"] / birds["kv_file"]
    kv.write_bytes(kv.read_bytes()[: kv.stat().st_size // 2])
    (root / "store" / meta_path(store.committed("fish.mp4")["video_key"])).write_text('{"video_id": "fish.mp4", ')
    return str(root / "store")


@pytest.fixture(scope="module")
def serve_app(archive, damaged_store):
    """The x2l Serve app on an in-process local Ray: the main app at /, a small-H-budget one at /tight, one that
    demands a bearer token at /auth, and one over a store with two damaged videos at /damaged."""
    import ray
    from ray import serve

    from x2l.serve import ServeArgs, app
    from x2l.testing.ray_head import free_port

    os.environ[TOKEN_ENV] = "s3cret"  # replicas inherit the driver's environment at ray.init
    temp_dir = tempfile.mkdtemp(prefix="x2lt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = {
        "store": archive["store"],
        "model": archive["model"],
        "max_batch_size": 8,
        "batch_wait_timeout_s": 0.2,
        "max_prompt_chars": 200,
        "max_prompt_tokens": 150,
        "max_questions_per_request": 20,
        "num_cpus": 0.1,  # 9 QueryModel replicas and 8 ingresses on 2 CPUs
    }

    def built(**args):  # Serve validates the arguments into the builder's typed argument, then calls the builder
        return app(ServeArgs.model_validate(base | args))

    serve.run(built(), name="main", route_prefix="/")
    serve.run(built(h_budget_bytes=max(h_memory(archive).values())), name="tight", route_prefix="/tight")
    serve.run(built(token_env=TOKEN_ENV), name="auth", route_prefix="/auth")
    serve.run(built(store=damaged_store), name="damaged", route_prefix="/damaged")
    serve.run(built(store=archive["live"]), name="live", route_prefix="/live")
    serve.run(built(num_replicas=2), name="shard", route_prefix="/shard")  # routed by video (the default)
    serve.run(built(max_videos_per_replica=1), name="count1", route_prefix="/count1")
    serve.run(built(route_by_video=False), name="spread", route_prefix="/spread")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
    os.environ.pop(TOKEN_ENV, None)


def h_memory(archive) -> dict[str, int]:
    """Bytes each video's H takes in a replica's memory (at the model's dtype, as the HCache counts it)."""
    from x2l.kv import h_bytes

    store = KVStore(archive["store"], dtype=archive["model_obj"].dtype)
    return {v: h_bytes(store.load_h(v)) for v in VIDEOS}


def ask(url: str, questions: list[dict], **kw) -> httpx.Response:
    return httpx.post(url + "/v1/answer", json={"questions": questions}, timeout=120, **kw)


def engine_answers(archive, questions: list[dict], top_k: int = 3) -> list:
    store = KVStore(archive["store"])
    answerer = Answerer(archive["model_obj"], store, RetrievalConfig(top_k=top_k, max_new_tokens=32))
    return answerer.answer([Question(q["video_id"], q["question"], q.get("options")) for q in questions])


QUESTIONS = [
    {"video_id": "cats.mp4", "question": "What color is the cat?"},
    {"video_id": "dogs.mp4", "question": "How many dogs run?", "options": ["one", "two", "three"]},
    {"video_id": "birds.mp4", "question": "Where does the bird land?"},
]


def test_http_and_handle_answers_equal_the_single_process_engine(serve_app, archive):
    from ray import serve

    expected = engine_answers(archive, QUESTIONS)
    r = ask(serve_app, QUESTIONS)
    assert r.status_code == 200
    got = r.json()["answers"]
    handle = serve.get_deployment_handle("QueryModel", app_name="main")
    via_handle = [handle.answer.remote(q).result() for q in QUESTIONS]
    for e, h, d in zip(expected, got, via_handle, strict=True):
        assert h["answer"] == d["answer"] == e.text
        assert h["selected_chunks"] == d["selected_chunks"] == e.selected_chunks
        assert {"load_h", "relevance", "fetch", "assemble", "decode", "queue", "total"} <= set(h["seconds"])
        assert h["store_bytes_read"] >= 0 and h["cache_hits"] >= 0


def test_batching_is_real(serve_app):
    before = httpx.get(serve_app + "/v1/stats").json()
    qs = [{"video_id": list(VIDEOS)[i % 4], "question": f"What happens at second {i}?"} for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda q: ask(serve_app, [q]).status_code, qs))
    assert codes == [200] * 16
    after = httpx.get(serve_app + "/v1/stats").json()
    sizes = after["batch_sizes"][len(before["batch_sizes"]) :]
    calls = after["decode_calls"] - before["decode_calls"]
    assert sum(sizes) == 16 and max(sizes) > 1
    assert calls < 16
    # "main" routes by video: Serve splits each batch by video, the replica joins the parts again, so one Answerer
    # call holds questions on more than one video (each video has 4 of the 16 here)
    assert max(sizes) > 4


def test_error_statuses_and_the_service_keeps_answering(serve_app):
    assert httpx.get(serve_app + "/healthz").json() == {"status": "ok"}
    r = ask(serve_app, [{"video_id": "unicorns.mp4", "question": "Where?"}])
    assert r.status_code == 404 and "unknown video id 'unicorns.mp4'" in r.json()["answers"][0]["error"]["message"]
    r = httpx.post(serve_app + "/v1/answer", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["status"] == 422
    r = ask(serve_app, [{"video_id": "cats.mp4"}])  # missing field
    assert r.status_code == 422 and "question" in r.json()["error"]["message"]
    r = ask(serve_app, [{"video_id": "cats.mp4", "question": "x" * 201}])
    assert r.status_code == 413 and "201 characters, the limit is 200" in r.json()["answers"][0]["error"]["message"]
    r = ask(serve_app, [{"video_id": "cats.mp4", "question": "q"}] * 21)
    assert r.status_code == 413 and "limit is 20" in r.json()["error"]["message"]
    # one bad question fails alone
    r = ask(serve_app, [{"video_id": "nope.mp4", "question": "q"}, QUESTIONS[0]])
    assert r.status_code == 200
    bad, good = r.json()["answers"]
    assert bad["error"]["status"] == 404 and "answer" in good
    # and the service still answers
    assert ask(serve_app, QUESTIONS[:1]).status_code == 200
    videos = httpx.get(serve_app + "/v1/videos").json()["videos"]
    assert sorted(v["video_id"] for v in videos) == sorted(VIDEOS)


def test_prompt_bounds_cover_options_and_tokens_and_refuse_alone(serve_app, archive):
    """The bound is on question + options, in characters and tokens; empty questions are refused; each refusal
    fails its own question only, at the ingress (never sent) and at a replica called through its handle."""
    from ray import serve

    refused = [
        (
            {"video_id": "cats.mp4", "question": "Which?", "options": ["o" * 40] * 5},
            413,
            "206 characters, the limit is 200",
        ),
        ({"video_id": "cats.mp4", "question": "视频" * 50}, 413, "tokens, the limit is 150"),  # 100 chars
        ({"video_id": "cats.mp4", "question": "  \n\t "}, 422, "question is empty"),
        ({"video_id": "cats.mp4", "question": ""}, 422, "question is empty"),
    ]
    before = httpx.get(serve_app + "/v1/stats").json()["questions"]
    r = ask(serve_app, [q for q, _, _ in refused] + [QUESTIONS[0]])
    assert r.status_code == 200
    *bad, good = r.json()["answers"]
    for (_, status, text), got in zip(refused, bad, strict=True):
        assert got["error"]["status"] == status and text in got["error"]["message"], got
    assert good["answer"] == engine_answers(archive, QUESTIONS[:1])[0].text
    assert httpx.get(serve_app + "/v1/stats").json()["questions"] == before + 1  # refused ones never reached it
    handle = serve.get_deployment_handle("QueryModel", app_name="main")
    calls = [handle.answer.remote(q) for q, _, _ in refused] + [handle.answer.remote(QUESTIONS[0])]
    *bad, good = [c.result() for c in calls]  # sent together: they share batches with the good one
    assert [b["error"]["status"] for b in bad] == [s for _, s, _ in refused] and "answer" in good


def test_damaged_videos_fail_alone_and_removed_videos_stop_being_answered(serve_app, archive, damaged_store):
    url = serve_app + "/damaged"
    assert httpx.get(url + "/healthz").status_code == 200
    r = httpx.get(url + "/v1/videos")
    assert r.status_code == 200
    videos = {v["video_id"] or "?": v for v in r.json()["videos"]}
    assert sorted(videos) == ["?", "birds.mp4", "cats.mp4", "dogs.mp4"]  # fish's meta is unreadable: key only
    assert "truncated" in videos["birds.mp4"]["damaged"] and "not valid JSON" in videos["?"]["damaged"]
    assert not videos["cats.mp4"]["h_loaded"] and "damaged" not in videos["cats.mp4"]  # nothing loaded at start
    qs = [{"video_id": v, "question": f"What moves in {v}?"} for v in VIDEOS]
    expected = engine_answers(archive, qs)
    r = ask(url, qs)
    assert r.status_code == 200
    got = dict(zip(VIDEOS, r.json()["answers"], strict=True))
    for (v, g), e in zip(got.items(), expected, strict=True):
        if v in ("birds.mp4", "fish.mp4"):
            assert g["error"]["status"] == 500 and f"video {v!r}" in g["error"]["message"], g
        else:
            assert g["answer"] == e.text
    held = {v["video_id"] for v in httpx.get(url + "/v1/videos").json()["videos"] if v.get("h_loaded")}
    assert held == {"cats.mp4", "dogs.mp4"}  # loaded on first use; the damaged ones never
    KVStore(damaged_store).remove("dogs.mp4")  # its H is loaded in the replica
    r = ask(url, [qs[1], qs[0]])
    gone, cats = r.json()["answers"]
    assert gone["error"]["status"] == 404 and "'dogs.mp4'" in gone["error"]["message"] and "answer" in cats
    assert "dogs.mp4" not in {v["video_id"] for v in httpx.get(url + "/v1/videos").json()["videos"]}
    # cats.mp4 recommitted with other KV (overwrite): its loaded H is dropped, H and L come from the new write
    import dataclasses

    src = KVStore(archive["store"])
    other = src.load_h("fish.mp4")
    for c, d in src.fetch_deltas("fish.mp4", list(range(other.n_chunks))).levels.items():
        other.chunks[c].delta = d
    KVStore(damaged_store).write(dataclasses.replace(other, video_id="cats.mp4"), source_hash="0" * 64, overwrite=True)
    expected = Answerer(archive["model_obj"], KVStore(damaged_store), RetrievalConfig(top_k=3, max_new_tokens=32))
    e = expected.answer([Question("cats.mp4", qs[0]["question"])])[0]
    got = ask(url, [qs[0]]).json()["answers"][0]
    assert got["answer"] == e.text and got["n_chunks"] == other.n_chunks != src.committed("cats.mp4")["n_chunks"]


def test_bearer_token(serve_app):
    url = serve_app + "/auth"
    assert httpx.get(url + "/healthz").status_code == 200  # open
    assert httpx.get(url + "/readyz").status_code == 200  # open
    unauthorized = {"error": {"status": 401, "message": "missing or wrong bearer token"}}
    for r in (
        httpx.get(url + "/v1/videos"),
        ask(url, QUESTIONS[:1]),
        ask(url, QUESTIONS[:1], headers={"Authorization": "Bearer wrong"}),
        ask(url, QUESTIONS[:1], headers={"Authorization": "Basic s3cret"}),
        httpx.get(url + "/docs"),
        httpx.get(url + "/openapi.json"),
    ):
        assert r.status_code == 401 and r.json() == unauthorized
    # the token is checked before the body is read: a malformed body without it is 401, not 422
    r = httpx.post(url + "/v1/answer", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json() == unauthorized
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = ask(url, QUESTIONS[:1], headers={"Authorization": f"{scheme} s3cret"})
        assert r.status_code == 200 and "answer" in r.json()["answers"][0]
    r = httpx.get(url + "/openapi.json", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and "/v1/answer" in r.json()["paths"]
    r = httpx.get(url + "/docs", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and "swagger" in r.text.lower()


def test_api_token_from_a_file_with_its_newline_still_matches_and_a_blank_one_is_refused(monkeypatch):
    from x2l.errors import ConfigError
    from x2l.serve import _authorized, api_token

    monkeypatch.setenv("X2L_T", "s3cret\n")  # as a secret mounted from a file arrives
    token = api_token("X2L_T")
    assert token == b"s3cret" and _authorized(token, "Bearer s3cret")
    monkeypatch.setenv("X2L_T", "  ")
    with pytest.raises(ConfigError, match="X2L_T is set but blank"):
        api_token("X2L_T")
    monkeypatch.delenv("X2L_T")
    assert api_token("X2L_T") is None


def test_every_error_body_has_one_shape(serve_app):
    def shape(r: httpx.Response, status: int) -> str:
        assert r.status_code == status, r.text
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"status", "message"}
        assert body["error"]["status"] == status
        return body["error"]["message"]

    r = httpx.post(serve_app + "/v1/answer", content=b"{not json", headers={"content-type": "application/json"})
    assert "JSON" in shape(r, 422)
    assert "questions.0.question: Field required" in shape(ask(serve_app, [{"video_id": "cats.mp4"}]), 422)
    assert "top_k" in shape(ask(serve_app, [{"video_id": "cats.mp4", "question": "q", "top_k": -1}]), 422)
    assert "limit is 20" in shape(ask(serve_app, [{"video_id": "cats.mp4", "question": "q"}] * 21), 413)
    shape(httpx.get(serve_app + "/no/such/route"), 404)


def test_results_echo_id_and_video_id_and_take_a_byte_budget(serve_app, archive):
    meta = KVStore(archive["store"]).info("fish.mp4")
    one_chunk = meta["chunks"][0]["delta_bytes"]
    qs = [
        {"id": "a", "video_id": "fish.mp4", "question": "What swims?", "budget_bytes": 0},
        {"id": "b", "video_id": "fish.mp4", "question": "What swims?", "budget_bytes": 2 * one_chunk, "top_k": 0},
        {"id": "c", "video_id": "nope.mp4", "question": "What swims?"},
    ]
    r = ask(serve_app, qs)
    assert r.status_code == 200
    a, b, c = r.json()["answers"]
    assert [x["id"] for x in (a, b, c)] == ["a", "b", "c"]
    assert [x["video_id"] for x in (a, b, c)] == ["fish.mp4", "fish.mp4", "nope.mp4"]
    assert a["selected_chunks"] == [] and c["error"]["status"] == 404
    store = KVStore(archive["store"])
    expected = Answerer(archive["model_obj"], store, RetrievalConfig(top_k=0, budget_bytes=2 * one_chunk)).answer(
        [Question("fish.mp4", "What swims?")]
    )[0]
    assert b["selected_chunks"] == expected.selected_chunks and len(b["selected_chunks"]) == 2
    assert b["answer"] == expected.text
    # a question's own relevance mass (issue 17), top_k its cap; a mass out of (0, 1] is the request's 422
    d = ask(serve_app, [{"video_id": "fish.mp4", "question": "What swims?", "mass": 0.5, "top_k": 4}]).json()
    expected = Answerer(archive["model_obj"], store, RetrievalConfig(top_k=4, mass=0.5)).answer(
        [Question("fish.mp4", "What swims?")]
    )[0]
    assert d["answers"][0]["selected_chunks"] == expected.selected_chunks and expected.selected_chunks
    r = ask(serve_app, [{"video_id": "fish.mp4", "question": "What swims?", "mass": 1.5}])
    assert r.status_code == 422 and "mass" in r.json()["error"]["message"]
    r = ask(serve_app, [{"video_id": "fish.mp4", "question": "What swims?", "mass": 0.5, "top_k": 0}])
    assert r.status_code == 422 and "mass with top_k 0" in r.json()["error"]["message"]


def test_readyz_once_the_query_replica_has_its_model(serve_app, archive):
    r = httpx.get(serve_app + "/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready" and body["dtype"] == "float32" and body["model"] == archive["model"]
    assert body["replica"] and body["h_videos"] >= 0


def test_app_builder_refuses_a_missing_model_or_store_before_deploying(archive, tmp_path):
    from x2l.errors import ConfigError
    from x2l.serve import ServeArgs, app
    from x2l.testing.ray_head import loopback_env

    with pytest.raises(ConfigError, match=f"store={tmp_path / 'none'}: store {tmp_path / 'none'} does not exist"):
        app(ServeArgs(store=str(tmp_path / "none"), model=archive["model"]))
    assert not (tmp_path / "none").exists()
    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "serve"),
            "run",
            "x2l.serve:app",
            f"store={archive['store']}",
            f"model={tmp_path / 'nomodel'}",
        ],
        capture_output=True,
        text=True,
        env=loopback_env(),
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"Error: x2l.serve: model directory {tmp_path / 'nomodel'} does not exist"
    # Serve validates the arguments into the builder's typed argument (ServeArgs) before calling it: one line too
    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "serve"),
            "run",
            "x2l.serve:app",
            f"store={archive['store']}",
            f"model={archive['model']}",
            "max_batch_size=0",
        ],
        capture_output=True,
        text=True,
        env=loopback_env(),
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "Error: x2l.serve: x2l.serve argument max_batch_size=0: must be >= 1"


def test_app_builder_names_an_unregistered_model_type_before_comparing_fingerprints(tmp_path):
    """A checkpoint of no registered family is refused as such, not as "the store holds another model's KV"."""
    from x2l.errors import ConfigError
    from x2l.models.registry import FAMILIES
    from x2l.serve import ServeArgs, app

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(ConfigError) as e:
        app(ServeArgs(store=str(tmp_path / "none"), model=str(tmp_path / "m")))
    want = f"x2l.serve: {tmp_path / 'm'}: model_type 'gemma3' is not supported (registered families: "
    assert str(e.value).startswith(want)
    assert all(f.name in str(e.value) for f in FAMILIES)


def test_app_arguments_resolve_local_paths_where_the_builder_checks_them(tmp_path, monkeypatch):
    """Replicas do not run in `serve run`'s working directory: a relative store= or model= is made absolute by the
    builder, the side that checked it, instead of being opened relative to a worker's directory."""
    from x2l.serve import ServeArgs

    monkeypatch.chdir(tmp_path)
    cfg = ServeArgs.model_validate({"store": "store", "model": "file://models/m"})
    assert (cfg.store, cfg.model) == (str(tmp_path / "store"), str(tmp_path / "models" / "m"))
    assert ServeArgs.model_validate({"store": "s3://x2l/store", "model": "m"}).store == "s3://x2l/store"


@pytest.mark.parametrize(
    "arg, message",
    [
        ({"dtype": "float17"}, "dtype='float17': use auto, float32, bfloat16 or float16"),
        ({"attn": "flash"}, "attn='flash': use sdpa or eager"),
        ({"num_replicas": "0"}, "num_replicas=0: must be >= 1"),
        ({"num_gpus": "-1"}, "num_gpus=-1.0: must be >= 0"),
        ({"h_budget_bytes": "-5"}, "h_budget_bytes=-5: must be >= 0"),
        ({"max_videos_per_replica": "-1"}, "max_videos_per_replica=-1: must be >= 0"),
        ({"route_by_video": "maybe"}, "route_by_video='maybe': expected bool"),
        (
            {"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}},
            "autoscaling_config={'min_replicas': 3, 'max_replicas': 2}: max_replicas (2) must be greater than or "
            "equal to min_replicas (3)!",
        ),
        (
            {"autoscaling_config": {"max_replica": 2}},
            "autoscaling_config={'max_replica': 2}: unknown key(s) ['max_replica']; Serve's autoscaling_config "
            "takes e.g. min_replicas, max_replicas, initial_replicas, target_ongoing_requests, upscale_delay_s, "
            "downscale_delay_s",
        ),
        (
            {"autoscaling_config": "{min_replicas: 1}"},
            "autoscaling_config='{min_replicas: 1}': not JSON (Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1))",
        ),
        (
            {"autoscaling_config": 4},
            "autoscaling_config=4: expected a mapping such as {min_replicas: 1, max_replicas: 4}",
        ),
        ({"selector": "magic"}, "selector='magic': unknown selector 'magic' in 'magic'; choose one of attention, "),
    ],
)
def test_app_builder_refuses_arguments_a_replica_would_refuse(archive, arg, message):
    """A replica whose constructor fails is restarted forever while `serve run` waits: such values stop the builder's
    typed argument, which Serve validates before it calls the builder."""
    from x2l.errors import ConfigError
    from x2l.serve import ServeArgs

    with pytest.raises(ConfigError) as e:
        ServeArgs.model_validate({"store": archive["store"], "model": archive["model"]} | arg)
    assert str(e.value).startswith(f"x2l.serve: x2l.serve argument {message}")


def test_replicas_or_serve_autoscaling_pass_to_the_query_deployment(archive):
    from x2l.errors import ConfigError
    from x2l.serve import ServeArgs, query_deployment

    base = {"store": archive["store"], "model": archive["model"]}
    assert query_deployment(ServeArgs.model_validate(base | {"num_replicas": 3})).num_replicas == 3
    scaling = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    d = query_deployment(ServeArgs.model_validate(base | {"autoscaling_config": scaling}))
    got = d._deployment_config.autoscaling_config  # Serve's parsed AutoscalingConfig
    assert (got.min_replicas, got.max_replicas, got.target_ongoing_requests) == (1, 4, 8)
    # `serve run x2l.serve:app ... autoscaling_config='{"min_replicas": 1, ...}'` passes every value as a string
    as_text = ServeArgs.model_validate(base | {"autoscaling_config": json.dumps(scaling)})
    assert as_text.autoscaling_config == scaling
    with pytest.raises(ConfigError, match="give num_replicas or autoscaling_config, not both"):
        ServeArgs.model_validate(base | {"autoscaling_config": scaling, "num_replicas": 2})


def test_reindex_while_serving_answers_from_the_new_index(serve_app, archive):
    """Another process re-indexes a served video with --overwrite (other chunking): the next question is answered
    from the new commit, including chunks the replica never fetched before."""
    url = serve_app + "/live"
    q = {"id": "x", "video_id": "live.mp4", "question": "What is shown?", "top_k": 2}
    before = ask(url, [q]).json()["answers"][0]
    assert before["n_chunks"] == 4  # 16 frames at 2 fps, 4 per chunk
    new = (
        Indexer(archive["model_obj"], SamplingConfig(fps=2, frames_per_chunk=2))
        .index(archive["live_video"], "live.mp4")
        .video
    )
    KVStore(archive["live"], archive["model_obj"].fingerprint).write(new, overwrite=True)
    for top_k in (2, 8):  # every chunk of the new index: deltas the replica never held
        r = ask(url, [q | {"top_k": top_k}])
        assert r.status_code == 200, r.text
        after = r.json()["answers"][0]
        assert after["n_chunks"] == 8 and len(after["selected_chunks"]) == top_k
    expected = Answerer(archive["model_obj"], KVStore(archive["live"]), RetrievalConfig(top_k=8)).answer(
        [Question("live.mp4", "What is shown?")]
    )[0]
    assert after["answer"] == expected.text
    stats = httpx.get(url + "/v1/stats").json()["h_cache"]
    assert stats["reloads"] == 1


def test_h_memory_budget_evicts_and_reloads_with_right_answers(serve_app, archive):
    url = serve_app + "/tight"
    qs = [{"video_id": v, "question": f"What moves in {v}?"} for v in VIDEOS] * 2
    expected = engine_answers(archive, qs)
    for q, e in zip(qs, expected, strict=True):  # one at a time: every switch of video evicts
        r = ask(url, [q])
        assert r.status_code == 200 and r.json()["answers"][0]["answer"] == e.text
    h = httpx.get(url + "/v1/stats").json()["h_cache"]
    assert h["evictions"] >= 4 and h["loads"] > len(VIDEOS) and h["videos"] <= 2
    assert h["bytes"] <= h["budget_bytes"]


def replica_stats(url: str, replicas: int) -> dict[str, dict]:
    """GET /v1/stats (any replica) until `replicas` distinct replicas have answered: replica id -> its stats."""
    seen: dict[str, dict] = {}
    for _ in range(600):  # Serve routes to the shorter of two queues, as last reported (cached a few seconds)
        s = httpx.get(url + "/v1/stats", timeout=60).json()
        seen[s["replica"]] = s
        if len(seen) == replicas:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"only replicas {sorted(seen)} answered GET {url}/v1/stats")


@functools.cache
def query_handle(app_name: str):
    """One QueryModel handle per app for this process: its router follows the replicas Serve reports."""
    from ray import serve

    handle = serve.get_deployment_handle("QueryModel", app_name=app_name)
    handle._init()
    return handle


def serve_routes(app_name: str) -> dict[str, set[str]]:
    """Replica id -> the multiplexed model ids (video ids) a QueryModel handle's request router knows it holds. Ray
    has no public view of this; its own multiplexing tests read the router the same way."""
    router = query_handle(app_name)._router._asyncio_router.request_router
    if router is None:  # not told the deployment's router class yet
        return {}
    return {r.replica_id.unique_id: set(r.multiplexed_model_ids) for r in router.curr_replicas.values()}


def wait_for_routes(app_name: str, home: dict[str, str]) -> None:
    """Until Serve's routers know that each video of `home` (video id -> replica id) is held by that replica:
    replicas report what they hold to the controller, which tells the routers, a moment after a video is loaded."""
    deadline = time.monotonic() + 120  # a hang guard, not a measurement
    while time.monotonic() < deadline:
        routes = serve_routes(app_name)
        if all(v in routes.get(r, set()) for v, r in home.items()):
            return
        time.sleep(0.1)
    raise AssertionError(f"Serve's router never learned {home}: {routes}")


def test_questions_on_a_video_go_to_the_replica_holding_its_h(serve_app, archive):
    """Two replicas routed by video (Serve's model multiplexing, the video id as the multiplexed model id): no
    replica loads H at start; each video is loaded by one replica, once, and every later question on it is answered
    there; the videos spread over both replicas (a new video goes to the replica holding the fewest)."""
    url = serve_app + "/shard"
    start = replica_stats(url, 2)
    assert all(s["h_cache"]["loads"] == 0 and s["h_cache"]["videos"] == 0 for s in start.values())
    assert all(s["routed_videos"] == [] and s["route_by_video"] for s in start.values())
    home = {}
    for v in VIDEOS:  # each video's first question alone, once Serve knows where the ones before it went
        r = ask(url, [{"video_id": v, "question": f"What is in {v}?"}])
        assert r.status_code == 200, r.text
        home[v] = r.json()["answers"][0]["replica"]
        wait_for_routes("shard", home)
    assert sorted(collections.Counter(home.values()).values()) == [2, 2]
    qs = [{"video_id": v, "question": f"What happens at second {i} of {v}?"} for i in range(3) for v in VIDEOS]
    expected = engine_answers(archive, qs)
    with ThreadPoolExecutor(len(qs)) as pool:
        results = list(pool.map(lambda q: ask(url, [q]).json()["answers"][0], qs))
    for q, r, e in zip(qs, results, expected, strict=True):
        assert r["answer"] == e.text and r["replica"] == home[q["video_id"]], (q, r)
    for v in VIDEOS:  # ?video_id= routes to the replica holding it, like a question
        s = httpx.get(url + "/v1/stats", params={"video_id": v}).json()
        assert s["replica"] == home[v] and v in s["h_cache"]["held"] and v in s["routed_videos"]
    end = replica_stats(url, 2)
    assert sum(s["h_cache"]["loads"] for s in end.values()) == len(VIDEOS)  # each video's H loaded once in all
    for rid, s in end.items():
        mine = sorted(v for v, r in home.items() if r == rid)
        assert s["h_cache"]["held"] == mine and s["routed_videos"] == mine
        assert s["h_cache"]["bytes"] == sum(h_memory(archive)[v] for v in mine)


def test_serve_unloading_a_video_drops_its_h(serve_app, archive):
    """max_videos_per_replica=1: Serve's multiplexing unloads the least recently used video before loading another
    (calling its HeldVideo's __del__), and the replica's HCache lets go of that video's H with it."""
    url = serve_app + "/count1"
    order = ["cats.mp4", "dogs.mp4", "cats.mp4"]
    qs = [{"video_id": v, "question": f"What moves in {v}?"} for v in order]
    for q, e in zip(qs, engine_answers(archive, qs), strict=True):
        r = ask(url, [q])
        assert r.status_code == 200 and r.json()["answers"][0]["answer"] == e.text
    s = httpx.get(url + "/v1/stats").json()
    assert s["max_videos_per_replica"] == 1 and s["unloads"] == 2 and s["routed_videos"] == ["cats.mp4"]
    h = s["h_cache"]
    assert (h["loads"], h["drops"], h["evictions"], h["held"]) == (3, 2, 0, ["cats.mp4"])
    assert h["bytes"] == h_memory(archive)["cats.mp4"]


def test_unknown_video_ids_unload_no_held_video(serve_app, archive):
    """max_videos_per_replica=1: a question on a video id the store lacks fails alone (404) and leaves the video
    the replica holds routed there with its H (Serve's loader would unload it before trying the unknown id)."""
    url = serve_app + "/count1"
    q = {"video_id": "cats.mp4", "question": "What moves in cats.mp4?"}
    assert ask(url, [q]).status_code == 200
    before = httpx.get(url + "/v1/stats").json()
    assert before["routed_videos"] == ["cats.mp4"]
    for unknown in ("nope.mp4", "nothing.mp4"):
        r = ask(url, [{"video_id": unknown, "question": "Anything?"}])
        assert r.status_code == 404 and r.json()["answers"][0]["error"]["status"] == 404
    s = httpx.get(url + "/v1/stats").json()
    assert s["routed_videos"] == ["cats.mp4"] and s["unloads"] == before["unloads"]
    assert s["h_cache"]["held"] == ["cats.mp4"] and s["h_cache"]["drops"] == before["h_cache"]["drops"]
    r = ask(url, [q])
    assert r.status_code == 200 and r.json()["answers"][0]["answer"] == engine_answers(archive, [q])[0].text


def test_h_byte_budget_of_one_video_evicts_when_two_alternate(serve_app, archive):
    """An H budget that holds one video (the largest): two videos asked in turn are each loaded again every time,
    least recently used out. Serve's count bound is off here, so Serve still routes both videos to this replica
    while its HCache holds one: the next question on the other one loads it again, on this replica."""
    url = serve_app + "/tight"
    before = httpx.get(url + "/v1/stats").json()["h_cache"]
    qs = [{"video_id": v, "question": f"What moves in {v}?"} for v in ["cats.mp4", "dogs.mp4"] * 2]
    for q, e in zip(qs, engine_answers(archive, qs), strict=True):
        r = ask(url, [q])
        assert r.status_code == 200 and r.json()["answers"][0]["answer"] == e.text
    s = httpx.get(url + "/v1/stats").json()
    h = s["h_cache"]
    assert h["loads"] - before["loads"] == 4 and h["evictions"] - before["evictions"] >= 3
    assert h["held"] == ["dogs.mp4"] and h["bytes"] == h_memory(archive)["dogs.mp4"] <= h["budget_bytes"]
    assert {"cats.mp4", "dogs.mp4"} <= set(s["routed_videos"])


def test_routing_by_video_off_answers_from_any_replica(serve_app, archive):
    """route_by_video=False: no multiplexing (Serve holds no video ids), a request's questions on two videos are
    answered right, each video's H loaded on first use."""
    url = serve_app + "/spread"
    qs = [{"video_id": v, "question": f"Where is the {v[:-5]}?"} for v in ("cats.mp4", "dogs.mp4")]
    r = ask(url, qs)
    assert r.status_code == 200
    for got, e in zip(r.json()["answers"], engine_answers(archive, qs), strict=True):
        assert got["answer"] == e.text and got["selected_chunks"] == e.selected_chunks
    s = httpx.get(url + "/v1/stats").json()
    assert not s["route_by_video"] and s["routed_videos"] == [] and s["unloads"] == 0
    assert s["h_cache"]["held"] == ["cats.mp4", "dogs.mp4"] and s["h_cache"]["loads"] == 2


def test_a_damaged_video_error_names_the_video_once():
    """The store's errors often name the video already ("video 'a.mp4': ..."): the message says it once."""
    from x2l.errors import CorruptionError, IncompatibleError
    from x2l.serve import _video_error

    for error in (CorruptionError("video 'a.mp4': H row group: checksum mismatch"), IncompatibleError("schema 9")):
        got = _video_error("a.mp4", error)["error"]
        assert got["status"] == 500 and got["message"].count("'a.mp4'") == 1, got
        assert got["message"].startswith("video 'a.mp4': ")


def test_held_video_releases_its_h_once():
    """Serve calls the multiplexed model's __del__ when it unloads it, and Python calls it again at garbage
    collection: the video's H is released once, so a HeldVideo of a later load keeps it."""
    import gc

    from x2l.serve import HeldVideo

    released: list[str] = []
    held = HeldVideo("cats.mp4", released.append)
    held.__del__()  # what ray.serve.multiplex does on unload
    later = HeldVideo("cats.mp4", released.append)  # the video loaded again
    del held
    gc.collect()
    assert released == ["cats.mp4"]
    del later
    gc.collect()
    assert released == ["cats.mp4", "cats.mp4"]


def test_store_unreachable_gives_503(tmp_path, archive, monkeypatch):
    """The query deployment over an S3 store whose server went away answers 503 and says why."""
    from x2l.serve import QueryModel, ServeArgs
    from x2l.testing.s3_server import LocalS3Server

    with LocalS3Server(str(tmp_path / "s3")) as server:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        uri = server.uri("gone")
        src = KVStore(archive["store"])
        dst = KVStore(uri, archive["model_obj"].fingerprint)
        for vid in ("cats.mp4", "dogs.mp4"):
            video = src.load_h(vid)
            for c, d in src.fetch_deltas(vid, list(range(video.n_chunks))).levels.items():
                video.chunks[c].delta = d
            meta = src.committed(vid)
            dst.write(video, source=meta["source"], source_hash=meta["source_sha256"])
        # the deployment's own class, run in this process; an H budget of 0 keeps nothing in memory
        model = QueryModel.func_or_class(ServeArgs(store=uri, model=archive["model"], h_budget_bytes=0))
    # the server is stopped now
    results = model._answer_batch([{"video_id": "dogs.mp4", "question": "q", "_arrived": time.time()}])
    assert results[0]["error"]["status"] == 503 and "unreachable" in results[0]["error"]["message"]


def write_questions(path: Path, n: int) -> list[dict]:
    rows = [
        {
            "id": f"q{i:03d}",
            "video_id": list(VIDEOS)[i % 4],
            "question": f"What is on screen at {i} s?",
            "options": ["A. a cat", "B. a dog"] if i % 5 == 0 else None,
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def run_bulk(archive, questions: Path, out: Path, *extra) -> subprocess.Popen:
    from x2l.testing.ray_head import loopback_env

    return subprocess.Popen(
        [
            sys.executable,
            "jobs/answer_questions.py",
            "--store",
            archive["store"],
            "--questions",
            str(questions),
            "--out",
            str(out),
            *map(str, extra),
        ],
        cwd=ROOT,
        env=loopback_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # its own process group: the driver and the Ray it started


def settled_parts(parts: Path, quiet_s: float = 5.0, limit_s: float = 60.0) -> set[str]:
    """Question ids in the parts once none has appeared for `quiet_s`: a Ray worker of the killed driver may finish
    the batch it holds before it notices its raylet is gone (observed in CI), and that part counts as answered."""

    def ids() -> set[str]:
        return {r["id"] for p in parts.glob("*.parquet") for r in pq.read_table(p).to_pylist()}

    seen, deadline = ids(), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = ids()
        if now == seen:
            return now
        seen = now
    raise AssertionError(f"parts under {parts} still changing {limit_s} s after the driver was killed")


def test_bulk_job_in_job_pool_killed_halfway_then_rerun_writes_every_answer_once(archive, tmp_path):
    qfile, out = tmp_path / "questions.jsonl", tmp_path / "answers"
    rows = write_questions(qfile, 56)
    args = ["--model", archive["model"], "--ray-address", "local", "--batch-size", 4, "--concurrency", 1]
    proc = run_bulk(archive, qfile, out, *args)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list((out / "parts").glob("*.parquet"))) < 3:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started die mid-run
    proc.wait()
    partial = settled_parts(out / "parts")
    assert 0 < len(partial) < len(rows)
    proc = run_bulk(archive, qfile, out, *args)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert f"{len(partial)} already answered, {len(rows) - len(partial)} to answer" in output
    answers = pq.read_table(out / "answers.parquet").to_pylist()
    assert [a["id"] for a in answers] == [r["id"] for r in rows]  # every question once, in order
    assert all(a["error"] is None and a["answer"] is not None for a in answers)
    jsonl = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in jsonl] == [r["id"] for r in rows]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["answered"] == len(rows) - len(partial) and summary["already_answered"] == len(partial)


def test_bulk_job_through_the_serve_app(serve_app, archive, tmp_path):
    qfile, out = tmp_path / "questions.jsonl", tmp_path / "answers"
    rows = write_questions(qfile, 50)
    proc = run_bulk(archive, qfile, out, "--serve-address", serve_app, "--in-flight", 16)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    answers = pq.read_table(out / "answers.parquet").to_pylist()
    assert [a["id"] for a in answers] == [r["id"] for r in rows]
    assert all(a["error"] is None for a in answers)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["answered"] == 50 and summary["latency_s"]["p50"] > 0
    assert 0 <= summary["l_cache_hit_rate"] <= 1
    # the run manifest reached the store
    from x2l.store.backend import open_backend
    from x2l.store.runs import read_runs

    assert any(
        s["kind"] == "answer" and s["run_id"] == summary["run_id"] for s in read_runs(open_backend(archive["store"]))
    )
    # a rerun has nothing left to do
    proc = run_bulk(archive, qfile, out, "--serve-address", serve_app)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "50 already answered, 0 to answer" in output


def test_bulk_job_refuses_bad_questions_alone(archive, tmp_path):
    """The bulk job's own check (characters, empty: never sent) and the in-job actor's (tokens too): each refused
    question gets its error row, its batch neighbours are answered."""
    import importlib.util

    import numpy as np

    from x2l.config import ModelConfig, StoreConfig
    from x2l.distributed.answering import AnswerActor, AnswerJobConfig
    from x2l.prompt import PromptLimits
    from x2l.questions import read_parts
    from x2l.store.backend import open_backend

    spec = importlib.util.spec_from_file_location("answer_questions", ROOT / "jobs" / "answer_questions.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = open_backend(str(tmp_path / "out"))
    todo = [
        {"id": "opts", "video_id": "cats.mp4", "question": "Which?", "options": ["o" * 100] * 3},
        {"id": "blank", "video_id": "cats.mp4", "question": " \t", "options": None},
        {"id": "fine", "video_id": "cats.mp4", "question": "What?", "options": ["a", "b"]},
    ]
    assert [q["id"] for q in job.refuse_questions(todo, PromptLimits(max_chars=200), out)] == ["fine"]
    rows = read_parts(out)
    assert "306 characters, the limit is 200" in rows["opts"]["error"] and "empty" in rows["blank"]["error"]

    actor = AnswerActor(
        AnswerJobConfig(
            StoreConfig(uri=archive["store"]),
            ModelConfig(archive["model"]),
            str(tmp_path / "out2"),
            limits=PromptLimits(max_tokens=150),
        )
    )
    actor(
        {
            "id": np.array(["long", "ok"]),
            "video_id": np.array(["cats.mp4", "cats.mp4"]),
            "question": np.array(["视频" * 50, QUESTIONS[0]["question"]]),
            "options": np.array(["", ""]),
        }
    )
    rows = read_parts(open_backend(str(tmp_path / "out2")))
    assert "tokens, the limit is 150" in rows["long"]["error"] and rows["ok"]["error"] is None
    assert rows["ok"]["answer"] == engine_answers(archive, QUESTIONS[:1])[0].text


def test_app_builder_refuses_selector_layers_the_model_lacks(tiny_checkpoints, tmp_path):
    """`selector=attention:layers=N` past the model's last layer: the builder's one line (a replica would refuse it
    at start and be restarted forever), before the store is looked at."""
    from transformers import AutoConfig

    from x2l.errors import ConfigError
    from x2l.serve import ServeArgs, app

    model = str(tiny_checkpoints["qwen2-vl"])
    n = AutoConfig.from_pretrained(model).text_config.num_hidden_layers
    with pytest.raises(ConfigError, match=f"selector='attention:layers={n}': layer {n} does not exist; the model has"):
        app(ServeArgs(store=str(tmp_path / "none"), model=model, selector=f"attention:layers={n}"))
    with pytest.raises(ConfigError, match="store="):  # the last layer is fine: the store check is reached
        app(ServeArgs(store=str(tmp_path / "none"), model=model, selector=f"key_similarity:layers={n - 1}"))
