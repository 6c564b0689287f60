"""A checkpoint's identity, whatever its family (issue 11): config, tokenizer and preprocessor files hashed whole,
and every safetensors weight file by its whole sha256, with the digests cached keyed by the files' stat.

x2l loads safetensors weights only (pickled weights can run code): `weight_files` refuses a checkpoint without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path

from x2l.errors import ModelError

FINGERPRINT_CACHE = ".x2l-fingerprint.json"
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")
# Files hashed whole besides the weights: what changes the model's behaviour without changing a weight.
HASHED_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "model.safetensors.index.json",
)


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors weight files, sorted. x2l loads nothing else (pickled weights can run code):
    ModelError in one line when the weights are only `pytorch_model.bin` & co. or missing."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLED_WEIGHTS) if path.is_dir() else []
    if pickled:
        raise ModelError(
            f"checkpoint {path} has weights only as {', '.join(pickled)} (PyTorch pickle): x2l loads "
            f"safetensors only; convert it (load it with transformers and save_pretrained, which "
            f"writes model.safetensors)"
        )
    raise ModelError(f"checkpoint {path} has no *.safetensors weight files")


def _cache_files(path: Path) -> list[Path]:
    """Where weight digests are cached: beside the checkpoint, else (read-only checkpoint) in the user's cache."""
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "x2l" / "fingerprints"
    tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return [path / FINGERPRINT_CACHE, user / f"{tag}.json"]


def _stat_key(f: Path) -> list[int]:
    """What must be unchanged for a cached digest to hold: size, inode, modification and status-change times (ns).
    Any write to the file moves mtime and ctime, and ctime cannot be set back by a user (utime moves it too)."""
    st = f.stat()
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def weight_digests(path: Path, files: list[Path]) -> dict[str, str]:
    """sha256 of every weight file, whole. Digests are cached (JSON, see _cache_files) keyed by _stat_key, so only
    new or changed files are read; an unreadable or unwritable cache just means hashing again."""
    cached: dict[str, list] = {}  # file name -> its entries in every cache (a stale one, e.g. a copied
    for cache in _cache_files(path):  # checkpoint's, must not hide a valid one in the user cache)
        try:
            doc = json.loads(cache.read_text())
            listed = doc.get("files", {}) if isinstance(doc, dict) else {}
            for name, entry in listed.items() if isinstance(listed, dict) else ():
                cached.setdefault(name, []).append(entry)
        except (OSError, ValueError):
            pass
    out, entries, fresh = {}, {}, False
    for f in files:
        key = _stat_key(f)
        hit = next(
            (
                e
                for e in cached.get(f.name, [])
                if isinstance(e, dict) and e.get("stat") == key and isinstance(e.get("sha256"), str)
            ),
            None,
        )
        if hit is not None:
            digest = hit["sha256"]
        else:
            with f.open("rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            fresh = True
        out[f.name] = digest
        entries[f.name] = {"stat": key, "sha256": digest}
    if fresh:
        data = json.dumps({"files": entries}, indent=1)
        for cache in _cache_files(path):
            tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(data)
                os.replace(tmp, cache)
                break
            except OSError:  # read-only checkpoint folder: try the next place; none writable: no cache
                with contextlib.suppress(OSError):
                    tmp.unlink()
    return out


def checkpoint_fingerprint(path: Path) -> str:
    """Identity of config + tokenizer + weights: two checkpoints that differ in any byte of these differ.

    Returns 32 hex digits. HASHED_FILES are hashed whole, and every safetensors weight file by its name and its
    whole sha256 (weight_digests: computed once, then cached beside the checkpoint keyed by size, inode, mtime and
    ctime). ModelError for a checkpoint without safetensors weights (issue 11).
    """
    path = Path(path)
    files = weight_files(path)
    h = hashlib.sha256()
    for name in HASHED_FILES:
        f = path / name
        if f.exists():
            h.update(name.encode() + b"\0" + f.read_bytes())
    for name, digest in weight_digests(path, files).items():
        h.update(f"{name}\0{digest}\0".encode())
    return h.hexdigest()[:32]
