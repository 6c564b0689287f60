"""The one LRU of x2l (issue 14): thread-safe, with a cost budget. Bytes for the H and L-delta caches
(x2l/caching.py), an entry count for the store's open-file metadata (x2l/store/kvstore.py)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class LRU:
    """Keeps items while their total cost fits `budget`, evicting the least recently used first. An item costing
    more than the whole budget is not kept (put returns False): caching it would evict everything for one item."""

    def __init__(self, budget: int):
        self.budget = budget
        self.cost = 0
        self.evictions = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Any, cost: int = 1) -> bool:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.cost -= old[1]
            if cost > self.budget:
                return False
            while self._items and self.cost + cost > self.budget:
                _, (_, c) = self._items.popitem(last=False)
                self.cost -= c
                self.evictions += 1
            self._items[key] = (value, cost)
            self.cost += cost
            return True

    def pop(self, key: Hashable) -> Any | None:
        """Remove the item and return its value (None if absent)."""
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self.cost -= item[1]
            return item[0]

    def discard(self, match: Callable[[Hashable], bool]) -> None:
        """Drop every item whose key matches (a video that was rewritten)."""
        with self._lock:
            for key in [k for k in self._items if match(k)]:
                self.cost -= self._items.pop(key)[1]

    def keys(self) -> list[Hashable]:
        """The keys held, least recently used first."""
        with self._lock:
            return list(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
