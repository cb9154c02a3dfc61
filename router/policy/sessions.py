"""Session pinning: once a session has carried sensitive data it stays on-prem.

A later request in the same session may refer back to what an earlier one sent ("now
summarise that ticket") without containing it, so its own detectors cannot see the
risk. As in LiteLLM's sensitive-data routing, the engine pins the session after every
sensitive decision and treats requests of a pinned session as sensitive until the pin
expires. Pins slide: each sensitive decision (including one caused by the pin itself)
restarts the time-to-live, so a session stays pinned while it is in active use.

The store is in memory and bounded. Entries are kept in pin order, which with a
constant TTL is also expiry order, so expired pins are dropped from the front cheaply
and, when the bound is reached, the pin closest to expiry is the one evicted (counted
in `evicted_live`, for a metric: an evicted live pin is the one way a pin ends early).
Session ids are kept as a 16-byte digest, never as given: an id can be as long as the
request metadata allows (kilobytes), so only a fixed size per pin bounds the store's
memory, and the store holds nothing a caller sent. (The audit layer keys its own hash.)
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

__all__ = ["SessionPins"]


def _key(session_id: str) -> bytes:
    raw = session_id.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(raw, digest_size=16).digest()


class SessionPins:
    """Thread-safe map of session id (digest) -> pin expiry (seconds on the caller's
    clock)."""

    def __init__(self, ttl: float, max_sessions: int) -> None:
        self._check(ttl, max_sessions)
        self._ttl = ttl
        self._max = max_sessions
        self._expiry: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted_live = 0

    @staticmethod
    def _check(ttl: float, max_sessions: int) -> None:
        if ttl <= 0:
            raise ValueError("session pin ttl must be positive")
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")

    @property
    def ttl(self) -> float:
        return self._ttl

    @property
    def max_sessions(self) -> int:
        return self._max

    def reconfigure(self, ttl: float, max_sessions: int) -> None:
        """Apply a reloaded policy's settings; existing pins keep their expiry."""
        self._check(ttl, max_sessions)
        with self._lock:
            self._ttl, self._max = ttl, max_sessions
            self._evict_over_bound()

    def pin(self, session_id: str, now: float) -> None:
        """Pin `session_id` until `now + ttl` (extending an existing pin)."""
        key = _key(session_id)
        with self._lock:
            self._expiry.pop(key, None)
            self._expiry[key] = now + self._ttl
            self._drop_expired(now)
            self._evict_over_bound()

    def is_pinned(self, session_id: str, now: float) -> bool:
        """Whether `session_id` carried sensitive data less than `ttl` ago."""
        key = _key(session_id)
        with self._lock:
            expiry = self._expiry.get(key)
            if expiry is None:
                return False
            if expiry <= now:
                del self._expiry[key]
                return False
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiry)

    def _drop_expired(self, now: float) -> None:
        while self._expiry:
            key, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                return
            del self._expiry[key]

    def _evict_over_bound(self) -> None:
        while len(self._expiry) > self._max:
            self._expiry.popitem(last=False)
            self.evicted_live += 1
