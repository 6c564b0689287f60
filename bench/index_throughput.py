"""Issue-4 numbers: the corpus indexing job on this machine, `small` checkpoint, with concurrency 1 and 2.

    .venv/bin/python bench/index_throughput.py [--videos 6] [--seconds 120] [--workdir bench_out]

Runs `python jobs/index_corpus.py --ray-address local` on a synthetic corpus of 224p videos into a fresh store per
setting and prints the run summaries: videos per minute, pre-filled tokens per second (wall and pre-fill only), and
the share of the actors' time spent waiting for decoded videos. One run per setting; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from x2l.store.backend import open_backend
from x2l.store.runs import read_runs
from x2l.testing.ray_head import loopback_env
from x2l.testing.tiny_models import write_tiny_checkpoint
from x2l.testing.videos import write_video

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=6)
    ap.add_argument("--seconds", type=int, default=120)
    ap.add_argument("--workdir", default="bench_out")
    args = ap.parse_args()
    work = Path(args.workdir)
    ckpt = work / "model-small"
    if not (ckpt / "config.json").exists():
        write_tiny_checkpoint(ckpt, size="small")
    corpus = work / f"corpus-{args.videos}x{args.seconds}s"
    corpus.mkdir(parents=True, exist_ok=True)
    for v in range(args.videos):
        path = corpus / f"video-{v}.mp4"
        if not path.exists():
            write_video(path, n_frames=args.seconds * 4, fps=4, size=(224, 400))
    out = {}
    for concurrency, threads in ((1, 2), (2, 1)):
        store = work / f"store-throughput-c{concurrency}"
        shutil.rmtree(store, ignore_errors=True)
        cmd = [
            sys.executable,
            "jobs/index_corpus.py",
            "--corpus",
            str(corpus),
            "--store",
            str(store),
            "--model",
            str(ckpt),
            "--concurrency",
            str(concurrency),
            "--torch-threads",
            str(threads),
            "--ray-address",
            "local",
        ]
        r = subprocess.run(cmd, cwd=ROOT, env=loopback_env(), capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"job failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        s = read_runs(open_backend(str(store)))[-1]
        out[f"concurrency {concurrency}"] = {
            k: s[k]
            for k in (
                "indexed",
                "wall_s",
                "tokens",
                "videos_per_minute",
                "tokens_per_second",
                "prefill_tokens_per_second",
                "decode_wait_share",
                "seconds",
            )
        } | {"torch_threads_per_actor": threads}
    print(json.dumps(out, indent=1))
    (work / "index_throughput.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
