"""A least-recently-used cache bounded by entry count and by total bytes, for featurized passages.

Serving answers many questions about the same context, so featurizing a context once pays; but contexts come
from callers, and an unbounded cache keyed by them grows with every new one (three 10 MB contexts held 8 GB). An
entry larger than the whole budget is computed and returned, never kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    def __init__(self, build: Callable[[K], V], size_of: Callable[[V], int], max_entries: int, max_bytes: int):
        self._build, self._size_of = build, size_of
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.total_bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def get(self, key: K) -> V:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
        value = self._build(key)
        size = self._size_of(value)
        if size > self.max_bytes or self.max_entries < 1:
            return value
        with self._lock:
            if key not in self._entries:
                self._entries[key] = (value, size)
                self.total_bytes += size
            while len(self._entries) > self.max_entries or self.total_bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.total_bytes -= dropped
        return value
