"""Signed, expiring URLs for files the gateway serves (generated images, datasets, artifacts)."""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import quote


class UrlSigner:
    def __init__(self, secret: bytes, base_url: str) -> None:
        self._secret = secret
        self.base_url = base_url.rstrip("/")

    def _sig(self, key: str, expires: int) -> str:
        msg = f"{key}\n{expires}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def sign(self, key: str, ttl_s: int, *, at: float | None = None) -> str:
        expires = int((time.time() if at is None else at) + ttl_s)
        return f"{self.base_url}/files/{quote(key)}?expires={expires}&sig={self._sig(key, expires)}"

    def check(self, key: str, expires: str | None, sig: str | None, *, at: float | None = None) -> str:
        """``ok``; ``expired`` (signed by this gateway, but its time is up); or ``invalid``
        (no signature, or not one this gateway made)."""
        if not expires or not sig or not expires.isdigit() or len(expires) > 12:
            return "invalid"
        if not hmac.compare_digest(self._sig(key, int(expires)), sig):
            return "invalid"
        if int(expires) < (time.time() if at is None else at):
            return "expired"
        return "ok"
