"""The drift recorder's backlog: observed requests waiting for the `drift` thread,
bounded by rows and by bytes (node/drift.py). A bound in requests is no bound: 256
requests of a text model can hold gigabytes of text."""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import numpy as np

__all__ = ["BACKLOG_BYTES", "BACKLOG_ROWS", "Backlog", "detached", "footprint"]

T = TypeVar("T")

# How far the recorder may lag behind before rows are dropped. A request is taken
# whole or dropped whole, and one is always taken when nothing waits, so the recorder
# keeps up with requests larger than the budget.
BACKLOG_ROWS = 16_384
BACKLOG_BYTES = 32 * 1024 * 1024


def detached(value: Any) -> Any:
    """`value`, copied if it is a NumPy view of a larger array: a view keeps all of its
    base alive, and `footprint` would count only the view (a window-sized slice of a
    5000-row request held 50 times what was counted). Views the size of their base (a
    reshape, an array over a request's bytes) are returned as they are: no copy."""
    if not isinstance(value, np.ndarray):
        return value
    base = value
    while isinstance(base.base, np.ndarray):
        base = base.base
    if base is value or base.nbytes <= value.nbytes:
        return value
    return value.copy()


def footprint(rows: Any, outputs: Mapping[str, Any] | None) -> int:
    """About the bytes an observed request keeps alive: its arrays, and the objects an
    object array refers to (texts), each by the memory it takes (`sys.getsizeof`: a
    str of non-ASCII text takes 1, 2 or 4 bytes a character and a header, which len()
    undercounts: 10,000 empty texts hold 0.5 MB)."""
    size = 0
    for value in (rows, *(outputs or {}).values()):
        array = np.asarray(value)
        size += array.nbytes
        if array.dtype == object:
            size += sum(map(sys.getsizeof, array.ravel().tolist()))
    return size


class Backlog(Generic[T]):
    """Observed requests waiting for the recorder thread, bounded by rows and bytes."""

    def __init__(self, max_rows: int, max_bytes: int) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.rows = 0
        self.bytes = 0
        self._items: deque[tuple[T, int, int]] = deque()
        self._ready = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T, rows: int, size: int) -> bool:
        """Queue `item` if it fits (or nothing waits); False if it was not taken."""
        with self._ready:
            full = self.rows + rows > self.max_rows or self.bytes + size > self.max_bytes
            if self._items and full:
                return False
            self._items.append((item, rows, size))
            self.rows += rows
            self.bytes += size
            self._ready.notify()
            return True

    def get(self, timeout: float = 0.0) -> T | None:
        """The oldest item, waiting up to `timeout` seconds for one; None if none came."""
        with self._ready:
            if not self._items and timeout > 0:
                self._ready.wait(timeout)
            if not self._items:
                return None
            item, rows, size = self._items.popleft()
            self.rows -= rows
            self.bytes -= size
            return item
