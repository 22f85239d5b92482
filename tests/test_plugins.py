"""Plugins: hooks documented, duplicate names refused, typos caught, a third-party provider,
and the openai captioner wired through config against a fake OpenAI-compatible server."""

from __future__ import annotations

import inspect
import zipfile
from pathlib import Path

import httpx
import pluggy
import pytest

from plugins import hookspecs
from plugins.hookspecs import hookimpl
from plugins.manager import PluginError, make_plugin_manager, providers
from providers.sandbox import SandboxProvider
from tests.fakes.openai_chat import FakeOpenAIChat

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_hook_is_documented_in_the_readme() -> None:
    text = README.read_text()
    pm = make_plugin_manager(load_entrypoints=False)
    for name in pm.hook.__dict__:
        if name.startswith("_"):
            continue
        spec = getattr(hookspecs, name)
        args = ", ".join(inspect.signature(spec).parameters)
        assert f"`{name}({args})`" in text, f"README.md does not document {name}({args})"


def test_builtins_register_through_the_hooks() -> None:
    pm = make_plugin_manager(load_entrypoints=False)
    assert "sandbox" in providers(pm)


def test_a_name_registered_twice_is_an_error() -> None:
    class Twin(SandboxProvider):
        name = "sandbox"

    class Plugin:
        @hookimpl
        def register_providers(self, register):
            register(Twin)

    pm = make_plugin_manager(load_entrypoints=False, extra=[Plugin()])
    with pytest.raises(PluginError, match="two providers are registered as 'sandbox'"):
        providers(pm)


def test_a_misspelt_hook_is_caught_at_start() -> None:
    class Typo:
        @hookimpl
        def register_provider(self, register):  # missing "s"
            pass

    with pytest.raises(pluggy.PluginValidationError):
        make_plugin_manager(load_entrypoints=False, extra=[Typo()])


def _captioner_config(**extra):
    return {
        "datasets": {"captioner": "openai"},
        "captioners": {"openai": {"base_url": "http://openai.test/v1", "model": "tiny-vlm", "api_key": "sk-test", **extra}},
    }


def _captions(api, lora_id: str) -> list[str]:
    local = api.gw.storage.local_path(f"loras/{lora_id}/dataset.zip")
    with zipfile.ZipFile(local) as z:
        return [z.read(n).decode() for n in sorted(z.namelist()) if n.endswith(".txt")]


async def test_openai_captioner_through_config(make_api) -> None:
    fake = FakeOpenAIChat(reply="a woman smiling in a park")
    async with make_api(transports={"captioner:openai": httpx.ASGITransport(app=fake.app)}, **_captioner_config()) as api:
        lora = await api.ready_lora()
        caps = _captions(api, lora["id"])
        assert caps == [f"{lora['triggerWord']}, a woman smiling in a park"] * 15
        assert len(fake.requests) == 15
        assert all(r.headers["authorization"] == "Bearer sk-test" for r in fake.requests)
        assert {r.json["model"] for r in fake.requests} == {"tiny-vlm"}


async def test_captioner_failure_falls_back_to_the_template(make_api, capsys) -> None:
    fake = FakeOpenAIChat()
    fake.script(status=500, times=1000)
    async with make_api(transports={"captioner:openai": httpx.ASGITransport(app=fake.app)}, **_captioner_config()) as api:
        lora = await api.ready_lora()
        caps = _captions(api, lora["id"])
        word = lora["triggerWord"]
        assert caps == [f"a photo of {word}, an east asian woman"] * 15
    logged = capsys.readouterr()
    assert "caption_failed" in logged.out + logged.err
    assert "sk-test" not in logged.out + logged.err
