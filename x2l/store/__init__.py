"""KV storage: byte backends (backend.py), the Parquet layout (schema.py) and the store of indexed videos
(kvstore.py), a reader and a writer of the types of x2l/kv.py. Nothing here imports the answering side (engine,
caching, serving). The store's names are imported lazily so `x2l.store.backend` stays light."""

from __future__ import annotations

from typing import Any

__all__ = ["KVStore", "StoreStats", "video_key", "SCHEMA_VERSION"]


def __getattr__(name: str) -> Any:
    if name in ("KVStore", "StoreStats"):
        from x2l.store import kvstore

        return getattr(kvstore, name)
    if name == "video_key":
        from x2l.store.keys import video_key

        return video_key
    if name == "SCHEMA_VERSION":
        from x2l.store.schema import SCHEMA_VERSION

        return SCHEMA_VERSION
    raise AttributeError(f"module 'x2l.store' has no attribute {name!r}")
