"""Time of the model fingerprint (issue 11) for a checkpoint with one 1 GB safetensors weight file: the first call
hashes the whole file, later calls find the digest cached beside the checkpoint.

    python bench/fingerprint_time.py [--gib 1.0] [--dir /tmp]

The file is freshly written, so the first call reads it from the page cache: on a cold disk add the time to read
1 GB from it. Not a test; numbers go in the notes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from x2l.models.fingerprint import FINGERPRINT_CACHE, checkpoint_fingerprint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="weight file size in GiB (default 1)")
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: the temp folder)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="x2l-fp-", dir=args.dir))
    try:
        (root / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
        n = int(args.gib * (1 << 30)) // 2
        save_file({"w": torch.randn(n, dtype=torch.float32).to(torch.bfloat16)}, str(root / "model.safetensors"))
        size = (root / "model.safetensors").stat().st_size
        times = {}
        for name in ("first", "cached", "cached_again"):
            t = time.perf_counter()
            fp = checkpoint_fingerprint(root)
            times[name] = round(time.perf_counter() - t, 4)
        (root / FINGERPRINT_CACHE).unlink()
        t = time.perf_counter()
        assert checkpoint_fingerprint(root) == fp
        times["first_again"] = round(time.perf_counter() - t, 4)
        print(json.dumps({"weight_bytes": size, "seconds": times, "fingerprint": fp}, indent=1))
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
