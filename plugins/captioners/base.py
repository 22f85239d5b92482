"""Captioners write one caption per dataset image; the trigger word must appear in it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import msgspec


class CaptionContext(msgspec.Struct, frozen=True, kw_only=True):
    trigger_word: str
    subject_kind: str  # person | style | object
    gender: str | None = None
    ethnicity: str | None = None
    age: str | None = None


class CaptionError(Exception):
    pass


class Captioner(ABC):
    name: ClassVar[str]
    config_type: ClassVar[type[msgspec.Struct]]

    def __init__(self, config: Any, http_client_factory: Any = None) -> None:
        self.config = config

    @abstractmethod
    async def caption(self, image_path: Path, ctx: CaptionContext) -> str:
        """Return a one-line caption for the (normalised JPEG) image. Raise CaptionError on failure."""

    async def aclose(self) -> None:
        return None
