"""The built-in, offline captioner: fills a per-subject-kind template.

It never fails and never needs the network, so it is also the fallback whenever another
captioner errors. Every caption it returns holds the trigger word as a whole word.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, ClassVar

import msgspec

from plugins.captioners.base import Captioner, CaptionContext
from plugins.hookspecs import hookimpl

__all__ = [
    "TemplateCaptioner",
    "TemplateCaptionerConfig",
    "describe_person",
    "ensure_trigger",
    "has_word",
]

_GENDER_NOUNS = {
    "female": "woman",
    "woman": "woman",
    "f": "woman",
    "male": "man",
    "man": "man",
    "m": "man",
}


class TemplateCaptionerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Templates per subject kind. ``{trigger}`` and ``{descriptor}`` are substituted literally."""

    person: str = "a photo of {trigger}, {descriptor}"
    style: str = "an image in the style of {trigger}"
    object: str = "a photo of {trigger}, an object"


def has_word(text: str, word: str) -> bool:
    """True when ``word`` occurs in ``text`` as a whole word (case-sensitive)."""
    if not word:
        return False
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def ensure_trigger(caption: str, trigger: str) -> str:
    """Return ``caption`` unchanged if it holds ``trigger`` as a whole word, else prefix it."""
    if has_word(caption, trigger):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def _article(phrase: str) -> str:
    """``a`` or ``an`` for the first word of ``phrase`` (handles ages such as 8, 11, 18, 80)."""
    first = phrase.split(" ", 1)[0].lower()
    if first.isdigit():
        vowel_sound = first.startswith("8") or (first[:2] in ("11", "18") and len(first) in (2, 4, 5))
    else:
        vowel_sound = first[:1] in ("a", "e", "i", "o", "u")
    return "an" if vowel_sound else "a"


def describe_person(gender: str | None, ethnicity: str | None, age: str | None) -> str:
    """A short noun phrase, e.g. ``"a 30 year old east asian woman"`` or ``"a person in their 30s"``.

    Age ``"30"`` → ``"30 year old"`` before the noun; ``"30s"`` → ``"in their 30s"`` after it;
    any other text → ``"aged <text>"`` after it. Missing fields are simply left out.
    """
    noun = _GENDER_NOUNS.get((gender or "").strip().lower(), "person")
    words: list[str] = []
    suffix = ""
    age_text = " ".join((age or "").split())
    if age_text.isdigit():
        words.append(f"{int(age_text)} year old")
    elif re.fullmatch(r"\d+s", age_text):
        suffix = f" in their {age_text}"
    elif age_text:
        suffix = f" aged {age_text}"
    ethnicity_text = " ".join((ethnicity or "").split())
    if ethnicity_text:
        words.append(ethnicity_text)
    words.append(noun)
    phrase = " ".join(words)
    return f"{_article(phrase)} {phrase}{suffix}"


class TemplateCaptioner(Captioner):
    """Deterministic captions from ``TemplateCaptionerConfig`` templates."""

    name: ClassVar[str] = "template"
    config_type: ClassVar[type[msgspec.Struct]] = TemplateCaptionerConfig

    def __init__(self, config: TemplateCaptionerConfig | None = None, http_client_factory: object = None) -> None:
        super().__init__(config if config is not None else TemplateCaptionerConfig())

    def render(self, ctx: CaptionContext) -> str:
        """The caption for ``ctx`` (pure; the image itself is not looked at)."""
        cfg: TemplateCaptionerConfig = self.config
        if ctx.subject_kind == "person":
            template = cfg.person
        elif ctx.subject_kind == "style":
            template = cfg.style
        else:
            template = cfg.object
        descriptor = describe_person(ctx.gender, ctx.ethnicity, ctx.age)
        text = template.replace("{trigger}", ctx.trigger_word).replace("{descriptor}", descriptor)
        return ensure_trigger(" ".join(text.split()), ctx.trigger_word)

    async def caption(self, image_path: Path, ctx: CaptionContext) -> str:
        return self.render(ctx)


@hookimpl
def register_captioners(register: Callable[[type], None]) -> None:
    """Register the built-in template captioner."""
    register(TemplateCaptioner)
