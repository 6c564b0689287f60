"""Where the Answerer gets KV from: the H level of a whole video at once, the L delta of chosen chunks lazily."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from x2l.compress import LevelKV, VideoKV
from x2l.errors import NotFoundError


@dataclass
class Fetch:
    """L deltas of some chunks of one video, and what getting them cost."""

    levels: dict[int, LevelKV]  # chunk -> its L delta
    bytes_read: dict[int, int] = field(default_factory=dict)  # chunk -> bytes requested from storage (0 if cached)
    cache_hits: set[int] = field(default_factory=set)  # chunks served from a cache


class KVSource(Protocol):
    def load_h(self, video_id: str) -> VideoKV:
        """Sink + every chunk's H (chunks may come without their delta)."""

    def fetch_deltas(self, video_id: str, chunks: list[int]) -> Fetch:
        """The L delta of each chunk in `chunks`."""


class InMemorySource:
    """VideoKVs held in memory with their deltas (single-process use, tests). Every delta is a cache hit."""

    def __init__(self, videos: Iterable[VideoKV]):
        self.videos = {v.video_id: v for v in videos}

    def load_h(self, video_id: str) -> VideoKV:
        if video_id not in self.videos:
            raise NotFoundError(f"unknown video id {video_id!r}")
        return self.videos[video_id]

    def fetch_deltas(self, video_id: str, chunks: list[int]) -> Fetch:
        video = self.load_h(video_id)
        return Fetch({c: video.chunks[c].delta for c in chunks}, {c: 0 for c in chunks}, set(chunks))
