"""A short-lived cache of authenticated keys, so a request needs no key lookup.

Entries live ``ttl_s`` seconds. Revoking or deactivating a key in this process clears the
cache at once; a change made by another process (the admin CLI) applies within ``ttl_s``.
Only successful lookups are cached, keyed by the key's digest, never the key itself.
"""

from __future__ import annotations

import time
from typing import Callable

from gateway.store.models import Principal


class AuthCache:
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_entries = max_entries
        self._entries: dict[bytes, tuple[float, Principal]] = {}

    def get(self, digest: bytes) -> Principal | None:
        if self.ttl_s <= 0:
            return None
        hit = self._entries.get(digest)
        if hit is None:
            return None
        expires, principal = hit
        if self.clock() >= expires:
            del self._entries[digest]
            return None
        return principal

    def put(self, digest: bytes, principal: Principal) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[digest] = (self.clock() + self.ttl_s, principal)

    def clear(self) -> None:
        self._entries.clear()
