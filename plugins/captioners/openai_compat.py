"""Captions from any OpenAI-compatible vision chat endpoint (OpenAI, Ollama, vLLM, LM Studio...).

POSTs ``{base_url}/chat/completions`` with the image as a JPEG data URL and post-processes the
reply into one line that holds the trigger word. Every failure becomes a short ``CaptionError``
that never carries the API key or the vendor's response body.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Callable, ClassVar

import anyio.to_thread
import httpx
import msgspec

from plugins.captioners.base import Captioner, CaptionContext, CaptionError
from plugins.captioners.template import ensure_trigger
from plugins.hookspecs import hookimpl

__all__ = ["OpenAICaptioner", "OpenAICaptionerConfig", "clean_caption"]

MAX_CAPTION_CHARS = 300

DEFAULT_PROMPT = (
    "Write a one-sentence caption for this photo for an image-model training dataset. "
    "Describe the subject, their pose and expression, clothing, the background and the lighting. "
    "Do not name or guess the identity of the person. Reply with the caption only."
)

_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb"}


class OpenAICaptionerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where and how to ask for captions."""

    base_url: str  # e.g. "http://127.0.0.1:11434/v1"
    model: str
    api_key: str | None = None
    timeout_s: float = 60
    max_tokens: int = 120
    prompt: str = DEFAULT_PROMPT


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message


class _ChatResponse(msgspec.Struct):
    choices: list[_Choice]


_decoder = msgspec.json.Decoder(_ChatResponse)


def clean_caption(text: str, trigger: str) -> str:
    """One line, no wrapping quotes, at most 300 chars (cut at a word), trigger ensured."""
    text = " ".join(text.split())
    while len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    if len(text) > MAX_CAPTION_CHARS:
        cut = text[:MAX_CAPTION_CHARS]
        space = cut.rfind(" ")
        text = (cut[:space] if space > 0 else cut).rstrip(" ,;:")
    if not text:
        return ""
    return ensure_trigger(text, trigger)


class OpenAICaptioner(Captioner):
    """Asks a vision model for a caption; one lazily built ``httpx.AsyncClient`` per instance."""

    name: ClassVar[str] = "openai"
    config_type: ClassVar[type[msgspec.Struct]] = OpenAICaptionerConfig

    def __init__(
        self,
        config: OpenAICaptionerConfig,
        http_client_factory: Callable[..., httpx.AsyncClient] | None = None,
    ) -> None:
        super().__init__(config)
        self._factory: Callable[..., httpx.AsyncClient] = http_client_factory or httpx.AsyncClient
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            cfg: OpenAICaptionerConfig = self.config
            headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
            self._client = self._factory(
                base_url=cfg.base_url, timeout=httpx.Timeout(cfg.timeout_s), headers=headers
            )
        return self._client

    def _body(self, jpeg: bytes) -> dict[str, Any]:
        cfg: OpenAICaptionerConfig = self.config
        data_url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
        return {
            "model": cfg.model,
            "max_tokens": cfg.max_tokens,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": cfg.prompt},
                        {"type": "image_url", "image_url": {"url": data_url}},
                    ],
                }
            ],
        }

    async def caption(self, image_path: Path, ctx: CaptionContext) -> str:
        try:
            jpeg = await anyio.to_thread.run_sync(Path(image_path).read_bytes)
        except OSError as exc:
            raise CaptionError(f"cannot read image: {type(exc).__name__}") from None
        body = msgspec.json.encode(self._body(jpeg))
        try:
            response = await self._http().post(
                "/chat/completions", content=body, headers={"Content-Type": "application/json"}
            )
        except httpx.TimeoutException:
            raise CaptionError("caption request timed out") from None
        except httpx.HTTPError as exc:
            raise CaptionError(f"caption request failed: {type(exc).__name__}") from None
        if not response.is_success:
            raise CaptionError(f"captioner returned HTTP {response.status_code}")
        try:
            parsed = _decoder.decode(response.content)
        except msgspec.MsgspecError:
            raise CaptionError("captioner returned an invalid response") from None
        content = parsed.choices[0].message.content if parsed.choices else None
        text = clean_caption(content or "", ctx.trigger_word)
        if not text:
            raise CaptionError("captioner returned an empty caption")
        return text

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


@hookimpl
def register_captioners(register: Callable[[type], None]) -> None:
    """Register the OpenAI-compatible captioner."""
    register(OpenAICaptioner)
