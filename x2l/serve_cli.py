"""`x2l serve STORE --model DIR`: the Serve app (x2l/serve.py) on a Ray of its own, until Ctrl-C or SIGTERM (issue 13).

One process does everything `serve run x2l.serve:app store=... model=...` does against a running cluster, without
one: it checks the model and store (the application builder's checks: a bad one is one line and exit 1), starts a
local Ray head as its child (`ray.init(address="local")`, loopback only, its own temp dir under /tmp; Ray's
processes are started fate-shared, so they die with this process even when it is killed), deploys the app at
`http://HOST:PORT/`, waits until `GET /readyz` answers 200 (a QueryModel replica has its model loaded), and
prints the URL on stdout. SIGINT (Ctrl-C) or SIGTERM: `serve.shutdown()`, `ray.shutdown()`, the temp dir removed;
exit 130 after SIGINT, 0 after SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any

from x2l.prompt import MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS

# The ServeArgs fields `x2l serve` takes as --options (store and model are its positional STORE and --model), with
# ServeArgs's defaults (tests/test_serve_cli.py checks they agree; written out so that building the CLI parser does
# not import Ray).
OPTIONS: dict[str, tuple[Any, str]] = {
    "num_replicas": (1, "QueryModel replicas, each with its own model and H cache"),
    "num_cpus": (0.5, "logical CPUs per QueryModel replica (fractional on small machines)"),
    "num_gpus": (0.0, "GPUs per QueryModel replica (0: the model runs on CPU)"),
    "max_batch_size": (16, "questions answered together by one replica call (@serve.batch)"),
    "batch_wait_timeout_s": (0.05, "seconds a batch waits to fill"),
    "h_budget_bytes": (1 << 30, "bytes of H (compact KV) a replica keeps in memory; least recently used out"),
    "l_cache_bytes": (256 << 20, "bytes of the replica's LRU cache of L deltas (fine KV)"),
    "top_k": (3, "chunks re-loaded at L per question (a question's own top_k wins)"),
    "selector": ("attention", "chunk selector: attention, calibrated, key_similarity or uniform (x2l/selectors/)"),
    "max_new_tokens": (32, "decode limit per answer (a question's own max_new_tokens wins)"),
    "max_prompt_chars": (
        MAX_PROMPT_CHARS,
        "refuse (413) a question whose text and options exceed this many characters",
    ),
    "max_prompt_tokens": (MAX_PROMPT_TOKENS, "refuse (413) a question whose prompt exceeds this many tokens"),
    "max_questions_per_request": (64, "refuse (413) a request with more questions"),
    "dtype": ("auto", "model dtype: auto, float32, bfloat16 or float16"),
    "attn": ("sdpa", "attention implementation: sdpa or eager"),
    "torch_threads": (0, "torch threads per replica (0: torch's default)"),
    "token_env": (
        "X2L_API_TOKEN",
        "environment variable holding the bearer token; when it is set, /v1/*, /docs and /openapi.json require it",
    ),
    "ready_timeout_s": (2.0, "seconds GET /readyz waits for a replica's answer before answering 503"),
    "route_by_video": (
        True,
        "route each question to the replica holding its video's H (Ray Serve model multiplexing by video id); "
        "--no-route-by-video: any replica",
    ),
    "max_videos_per_replica": (
        0,
        "videos Serve keeps routed to one replica, least recently used unloaded with their H (0: no count bound; "
        "h_budget_bytes alone)",
    ),
    "autoscaling_config": (
        None,
        'Serve autoscaling of the QueryModel replicas as JSON, e.g. \'{"min_replicas": 1, "max_replicas": 4, '
        '"target_ongoing_requests": 8}\' (instead of --num-replicas)',
    ),
}


def _json_mapping(text: str) -> Any:
    """--autoscaling-config's value: JSON (ServeArgs checks it is a mapping Serve takes)."""
    try:
        return json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `x2l serve` arguments: STORE, --model, --host, --port, --startup-timeout and one option per entry of
    OPTIONS (a ServeArgs field, with its default)."""
    p.add_argument("store", help="store URI (local folder or s3://bucket/prefix) indexed with --model")
    p.add_argument("--model", required=True, help="checkpoint directory the store was indexed with")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP server binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for GET /readyz to answer 200 before giving up (default 600)",
    )
    for name, (default, text) in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif name == "num_replicas":  # None when not given: giving it with --autoscaling-config is refused
            p.add_argument(flag, type=int, default=None, help=f"{text} (default {default})")
        elif default is None:
            p.add_argument(flag, type=_json_mapping, default=None, metavar="JSON", help=f"{text} (default: none)")
        else:
            p.add_argument(flag, type=type(default), default=default, help=f"{text} (default {default})")


class Stop(BaseException):
    """Raised in the main thread by SIGINT / SIGTERM; `code` is the exit status it ends with."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _stop_on(signum: int, _frame) -> None:
    raise Stop(130 if signum == signal.SIGINT else 0)


def check_port(host: str, port: int) -> None:
    """ConfigError when PORT is not a TCP port (1-65535; 0 would let the OS pick one this command cannot print) or
    HOST:PORT cannot be bound (in use, or not an address of this machine). Bound as Serve's HTTP proxy binds it
    (uvicorn / asyncio: SO_REUSEADDR), so connections of a server stopped moments ago, left in TIME_WAIT, do not
    count as in use; on Linux a port someone listens on still is."""
    from x2l.errors import ConfigError

    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: not a TCP port (1-65535)")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None


def wait_ready(url: str, timeout_s: float) -> dict:
    """Poll GET URL/readyz until it answers 200; its JSON body. RuntimeError after timeout_s."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/readyz", timeout=10)
            if r.status_code == 200:
                return r.json()
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.5)
    raise RuntimeError(f"GET {url}/readyz did not answer 200 within {timeout_s:g} s (last: {last})")


def run_serve(args: argparse.Namespace, verbose: bool = False) -> int:
    """Serve until SIGINT (returns 130) or SIGTERM (returns 0). Bad model, store, options or port: ConfigError
    before Ray starts. A deployment that does not come up: X2LError naming the cause, after everything started is
    shut down."""
    from x2l.errors import ConfigError, X2LError
    from x2l.serve import AppConfigError, ServeArgs, check_deployable

    config: dict[str, Any] = {"store": args.store, "model": args.model}
    config |= {name: getattr(args, name) for name in OPTIONS}
    if config["num_replicas"] is None:
        config.pop("num_replicas")  # ServeArgs's default; --num-replicas N with --autoscaling-config is refused there
    try:
        cfg = ServeArgs.model_validate(config)  # what Serve does with `serve run` arguments
    except AppConfigError as e:
        raise ConfigError(e.detail) from None
    check_deployable(cfg)  # the application builder's own checks, before Ray starts
    if not args.startup_timeout > 0:  # argument checks first: which error wins must not depend on the port's state
        raise ConfigError(f"--startup-timeout {args.startup_timeout:g}: must be > 0 seconds")
    check_port(args.host, args.port)

    for var, value in {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }.items():
        os.environ.setdefault(var, value)  # loopback only; inherited by Ray's processes and the replicas
    previous = {s: signal.signal(s, _stop_on) for s in (signal.SIGINT, signal.SIGTERM)}
    temp_dir = tempfile.mkdtemp(prefix="x2lserve", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    code = 0
    try:
        import ray

        from x2l.serve import deploy

        if not verbose:
            logging.getLogger("ray").setLevel(logging.ERROR)
            logging.getLogger("ray.serve").setLevel(logging.ERROR)
        ray.init(
            address="local",
            include_dashboard=False,
            _temp_dir=temp_dir,
            _node_ip_address="127.0.0.1",
            logging_level=logging.INFO if verbose else logging.ERROR,
            log_to_driver=verbose,
        )
        for s in previous:  # Ray's core worker installs its own SIGTERM handler (a stack dump, then abort): ours wins
            signal.signal(s, _stop_on)
        url = f"http://{args.host}:{args.port}"
        print(
            f"x2l serve: Ray started (temp dir {temp_dir}); deploying x2l.serve:app at {url}",
            file=sys.stderr,
            flush=True,
        )
        try:
            deploy(cfg, args.host, args.port)
        except (Stop, X2LError):
            raise
        except Exception as e:  # noqa: BLE001 - a replica that failed to start: one line, not Serve's traceback
            first = (str(e).strip().splitlines() or [""])[-1]
            raise X2LError(f"the Serve app did not start: {type(e).__name__}: {first}") from e
        try:
            wait_ready(
                url if args.host not in ("0.0.0.0", "::") else f"http://127.0.0.1:{args.port}", args.startup_timeout
            )
        except RuntimeError as e:
            raise X2LError(str(e)) from e
        print(url, flush=True)
        print(
            "x2l serve: ready (POST /v1/answer, GET /v1/videos, /v1/stats, /healthz, /readyz, /docs); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        while True:
            time.sleep(3600)
    except Stop as s:
        code = s.code
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C does not cut the shutdown short
        print("x2l serve: stopping", file=sys.stderr, flush=True)
        try:
            from x2l.serve import shutdown

            shutdown()
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)
            for s, handler in previous.items():
                signal.signal(s, handler)
    return code
