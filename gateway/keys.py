"""API keys: ``afk_`` + 40 url-safe random characters, shown once, stored as sha256."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "afk_"


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(30)  # 40 characters


def key_digest(key: str) -> bytes:
    """The stored form of a key, and (per Apiframe) the raw webhook-signing secret."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def display_prefix(key: str) -> str:
    return key[:8]
