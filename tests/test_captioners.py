"""Captioners: template wording, trigger-word rule, and the OpenAI-compatible client against a fake."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pluggy
import pytest

from plugins import hookspecs
from plugins.captioners import openai_compat, template
from plugins.captioners.base import CaptionContext, CaptionError
from plugins.captioners.openai_compat import OpenAICaptioner, OpenAICaptionerConfig, clean_caption
from plugins.captioners.template import TemplateCaptioner, TemplateCaptionerConfig, has_word
from tests.fakes.openai_chat import FakeOpenAIChat
from tests.images import make_image

TRIGGER = "TOK3X"


def person(**kw: Any) -> CaptionContext:
    return CaptionContext(trigger_word=TRIGGER, subject_kind="person", **kw)


# --------------------------------------------------------------------------- template


@pytest.mark.parametrize(
    ("ctx", "expected"),
    [
        (person(gender="female", ethnicity="east asian", age="30"), "a photo of TOK3X, a 30 year old east asian woman"),
        (person(gender="male", ethnicity="black", age="45"), "a photo of TOK3X, a 45 year old black man"),
        (person(gender="non-binary", age="25"), "a photo of TOK3X, a 25 year old person"),
        (person(gender="female", age="30s"), "a photo of TOK3X, a woman in their 30s"),
        (person(gender="male", ethnicity="hispanic", age="about forty"), "a photo of TOK3X, a hispanic man aged about forty"),
        (person(gender="female", ethnicity="indian"), "a photo of TOK3X, an indian woman"),
        (person(gender="male", age="80"), "a photo of TOK3X, an 80 year old man"),
        (person(age="18"), "a photo of TOK3X, an 18 year old person"),
        (person(), "a photo of TOK3X, a person"),
        (CaptionContext(trigger_word=TRIGGER, subject_kind="style"), "an image in the style of TOK3X"),
        (CaptionContext(trigger_word=TRIGGER, subject_kind="object"), "a photo of TOK3X, an object"),
    ],
)
async def test_template_wording(ctx: CaptionContext, expected: str, tmp_path: Path) -> None:
    assert await TemplateCaptioner(TemplateCaptionerConfig()).caption(tmp_path / "x.jpg", ctx) == expected


async def test_template_always_holds_trigger_as_whole_word(tmp_path: Path) -> None:
    # custom templates that forget the trigger, or glue it to another word, still get it
    cfg = TemplateCaptionerConfig(person="portrait of {descriptor}", style="x{trigger}y", object="  ")
    cap = TemplateCaptioner(cfg)
    for kind in ("person", "style", "object", "unknown"):
        text = await cap.caption(tmp_path / "x.jpg", CaptionContext(trigger_word=TRIGGER, subject_kind=kind))
        assert has_word(text, TRIGGER), text
        assert "\n" not in text and text == text.strip()
    assert cap.render(CaptionContext(trigger_word=TRIGGER, subject_kind="person")) == "TOK3X, portrait of a person"


def test_template_config_is_strict() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"person": "{trigger}", "animal": "x"}, TemplateCaptionerConfig)


def test_has_word() -> None:
    assert has_word("TOK3X, a woman", TRIGGER)
    assert has_word("a photo of TOK3X.", TRIGGER)
    assert not has_word("TOK3XY smiling", TRIGGER)
    assert not has_word("aTOK3X", TRIGGER)
    assert not has_word("tok3x", TRIGGER)


def test_both_captioners_register_through_the_hook() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(template)
    pm.register(openai_compat)
    seen: list[type] = []
    pm.hook.register_captioners(register=seen.append)
    assert {c.name for c in seen} == {"template", "openai"}


# --------------------------------------------------------------------------- openai-compatible


@pytest.fixture
def jpeg_path(tmp_path: Path) -> Path:
    path = tmp_path / "001.jpg"
    path.write_bytes(make_image("JPEG", (64, 48)))
    return path


def openai(fake: FakeOpenAIChat | None = None, factory: Any = None, **cfg: Any) -> OpenAICaptioner:
    config = OpenAICaptionerConfig(base_url="http://openai.test/v1", model="llava:7b", **cfg)
    return OpenAICaptioner(config, http_client_factory=factory or (fake and fake.client_factory))


async def test_request_shape_with_api_key(jpeg_path: Path) -> None:
    fake = FakeOpenAIChat()
    cap = openai(fake, api_key="sk-test-123", max_tokens=77)
    text = await cap.caption(jpeg_path, person())
    await cap.aclose()
    assert text == "TOK3X, a woman smiling in a park"
    [req] = fake.requests
    assert req.method == "POST" and req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-test-123"
    assert req.headers["content-type"] == "application/json"
    body = req.json
    assert body["model"] == "llava:7b" and body["max_tokens"] == 77
    [msg] = body["messages"]
    assert msg["role"] == "user"
    text_part, image_part = msg["content"]
    assert text_part == {"type": "text", "text": openai_compat.DEFAULT_PROMPT}
    url = image_part["image_url"]["url"]
    assert image_part["type"] == "image_url" and url.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == jpeg_path.read_bytes()


async def test_no_auth_header_without_key(jpeg_path: Path) -> None:
    fake = FakeOpenAIChat()
    cap = openai(fake)
    await cap.caption(jpeg_path, person())
    await cap.aclose()
    assert "authorization" not in fake.requests[0].headers


async def test_one_client_built_lazily_with_config_and_closed(jpeg_path: Path) -> None:
    fake = FakeOpenAIChat()
    made: list[tuple[dict[str, Any], httpx.AsyncClient]] = []

    def factory(**kwargs: Any) -> httpx.AsyncClient:
        client = fake.client_factory(**kwargs)
        made.append((kwargs, client))
        return client

    cap = openai(factory=factory, api_key="k", timeout_s=12.5)
    assert made == []
    await cap.caption(jpeg_path, person())
    await cap.caption(jpeg_path, person())
    assert len(made) == 1
    kwargs, client = made[0]
    assert kwargs["base_url"] == "http://openai.test/v1"
    assert kwargs["timeout"] == httpx.Timeout(12.5)
    await cap.aclose()
    assert client.is_closed


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("a woman smiling in a park", "TOK3X, a woman smiling in a park"),
        ("A photo of TOK3X smiling in a park.", "A photo of TOK3X smiling in a park."),
        ('  "TOK3X standing\n\n on a  beach"  ', "TOK3X standing on a beach"),
        ("\u201ca man in a red coat\u201d", "TOK3X, a man in a red coat"),
        ("TOK3XY waves", "TOK3X, TOK3XY waves"),
    ],
)
async def test_reply_post_processing(jpeg_path: Path, reply: str, expected: str) -> None:
    fake = FakeOpenAIChat(reply=reply)
    cap = openai(fake)
    assert await cap.caption(jpeg_path, person()) == expected
    await cap.aclose()


def test_clean_caption_caps_length_at_a_word() -> None:
    text = clean_caption("TOK3X " + "word " * 100, TRIGGER)
    assert len(text) <= 300 and text.startswith("TOK3X word") and text.endswith("word")


async def test_http_500_is_caption_error_without_secrets(jpeg_path: Path) -> None:
    fake = FakeOpenAIChat()
    fake.script(status=500, times=1, body=b'{"error": "boom sk-secret-key internal trace"}')
    cap = openai(fake, api_key="sk-secret-key")
    with pytest.raises(CaptionError) as err:
        await cap.caption(jpeg_path, person())
    assert "500" in str(err.value)
    assert "sk-secret-key" not in str(err.value) and "internal trace" not in str(err.value)
    # the script is used up: the next call succeeds
    assert await cap.caption(jpeg_path, person()) == "TOK3X, a woman smiling in a park"
    await cap.aclose()


async def test_scripted_failures_repeat(jpeg_path: Path) -> None:
    fake = FakeOpenAIChat()
    fake.script(status=429, times=2)
    cap = openai(fake)
    for _ in range(2):
        with pytest.raises(CaptionError, match="429"):
            await cap.caption(jpeg_path, person())
    await cap.caption(jpeg_path, person())
    await cap.aclose()
    assert len(fake.requests) == 3


async def test_timeout_is_caption_error(jpeg_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    cap = openai(factory=lambda **kw: httpx.AsyncClient(transport=httpx.MockTransport(handler), **kw))
    with pytest.raises(CaptionError, match="timed out"):
        await cap.caption(jpeg_path, person())
    await cap.aclose()


async def test_connection_error_is_caption_error(jpeg_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    cap = openai(factory=lambda **kw: httpx.AsyncClient(transport=httpx.MockTransport(handler), **kw))
    with pytest.raises(CaptionError, match="ConnectError"):
        await cap.caption(jpeg_path, person())


@pytest.mark.parametrize(
    "body",
    [
        b"<html>garbage</html>",
        b'{"choices": "nope"}',
        b'{"choices": []}',
        b'{"choices": [{"message": {"content": null}}]}',
        b'{"choices": [{"message": {"content": "  \\"\\"  "}}]}',
    ],
)
async def test_bad_or_empty_reply_is_caption_error(jpeg_path: Path, body: bytes) -> None:
    fake = FakeOpenAIChat()
    fake.script(status=200, body=body)
    cap = openai(fake)
    with pytest.raises(CaptionError) as err:
        await cap.caption(jpeg_path, person())
    assert "garbage" not in str(err.value)
    await cap.aclose()


async def test_empty_content_from_fake_is_caption_error(jpeg_path: Path) -> None:
    cap = openai(FakeOpenAIChat(reply=""))
    with pytest.raises(CaptionError, match="empty"):
        await cap.caption(jpeg_path, person())


async def test_unknown_response_fields_are_ignored(jpeg_path: Path) -> None:
    fake = FakeOpenAIChat()
    fake.script(
        status=200,
        body=b'{"id": "x", "system_fingerprint": "fp", "choices": [{"index": 0, "logprobs": null,'
        b' "message": {"role": "assistant", "content": "a dog", "refusal": null}}]}',
    )
    cap = openai(fake)
    assert await cap.caption(jpeg_path, person()) == "TOK3X, a dog"


async def test_fake_rejects_non_jpeg(tmp_path: Path) -> None:
    png = tmp_path / "x.png"
    png.write_bytes(make_image("PNG"))
    fake = FakeOpenAIChat()
    cap = openai(fake)
    with pytest.raises(CaptionError, match="400"):
        await cap.caption(png, person())
    assert fake.requests[0].json["model"] == "llava:7b"  # well-formed body; only the image was refused


async def test_fake_rejects_wrong_shape() -> None:
    fake = FakeOpenAIChat()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app), base_url="http://openai.test/v1") as c:
        r = await c.post("/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400
        r = await c.post("/chat/completions", content=b"not json")
        assert r.status_code == 400
        r = await c.get("/models")
        assert r.status_code == 404
    assert len(fake.requests) == 3


async def test_missing_image_file_is_caption_error(tmp_path: Path) -> None:
    cap = openai(FakeOpenAIChat())
    with pytest.raises(CaptionError, match="cannot read"):
        await cap.caption(tmp_path / "missing.jpg", person())
