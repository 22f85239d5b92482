"""Trigger words and the prompt rule."""

from __future__ import annotations

import re
import secrets

LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I or O (read as 1 and 0)
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ23456789"
LENGTH = 5


def generate_trigger_word() -> str:
    """5 characters from A–Z and 2–9 with at least one letter (placed at a random position)."""
    chars = [secrets.choice(ALPHABET) for _ in range(LENGTH)]
    if not any(c.isalpha() for c in chars):
        chars[secrets.randbelow(LENGTH)] = secrets.choice(LETTERS)
    return "".join(chars)


def is_valid_trigger_word(word: str) -> bool:
    return len(word) == LENGTH and all(c in ALPHABET for c in word) and any(c.isalpha() for c in word)


def contains_word(text: str, word: str) -> bool:
    """Whether ``word`` appears in ``text`` as a whole word (case-sensitive)."""
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text) is not None


def apply_trigger(prompt: str, gateway_word: str, provider_word: str | None = None) -> str:
    """Apiframe's rule: keep the prompt if it holds the trigger word as a whole word, else prepend
    it. For a provider with its own word, the gateway's word is then swapped for the vendor's."""
    out = prompt if contains_word(prompt, gateway_word) else f"{gateway_word} {prompt}"
    if provider_word and provider_word != gateway_word:
        out = re.sub(rf"(?<![\w]){re.escape(gateway_word)}(?![\w])", lambda _m: provider_word, out)
    return out
