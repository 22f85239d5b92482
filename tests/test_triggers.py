"""Trigger words: the format, uniqueness among live LoRAs, and the prompt rule."""

from __future__ import annotations

import re
import zipfile

import pytest

from gateway.services import loras as lora_service
from gateway.store import loras as loras_store
from gateway.triggers import apply_trigger, contains_word, generate_trigger_word, is_valid_trigger_word
from plugins.hookspecs import hookimpl
from providers.sandbox import SandboxProvider
from tests.conftest import Api


def test_generated_words_have_the_format() -> None:
    words = [generate_trigger_word() for _ in range(5000)]
    for w in words:
        assert re.fullmatch(r"[A-Z2-9]{5}", w) and any(c.isalpha() for c in w), w
        assert is_valid_trigger_word(w)
    assert len(set(words)) > 4900  # random, not a sequence


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a photo on a beach", "TOK3X a photo on a beach"),
        ("TOK3X on a beach", "TOK3X on a beach"),
        ("portrait of TOK3X, smiling", "portrait of TOK3X, smiling"),
        ("(TOK3X) in rain", "(TOK3X) in rain"),
        ("TOK3XY on a beach", "TOK3X TOK3XY on a beach"),  # not a whole word
        ("xTOK3X", "TOK3X xTOK3X"),
        ("tok3x lowercase", "TOK3X tok3x lowercase"),  # case-sensitive, like the word itself
    ],
)
def test_prompt_rule(prompt: str, expected: str) -> None:
    assert apply_trigger(prompt, "TOK3X") == expected


def test_vendor_word_is_swapped_in() -> None:
    assert apply_trigger("a photo on a beach", "TOK3X", "MYLORA_81") == "MYLORA_81 a photo on a beach"
    assert apply_trigger("TOK3X and TOK3X", "TOK3X", "V1") == "V1 and V1"
    assert contains_word("hello TOK3X.", "TOK3X") and not contains_word("TOK3X_2", "TOK3X")


async def test_words_are_unique_among_live_loras(api: Api) -> None:
    ids = [(await api.create_lora()).json()["id"] for _ in range(3)]
    async with api.gw.db.read() as conn:
        words = [(await loras_store.get_lora(conn, i)).trigger_word for i in ids]
    assert len(set(words)) == 3
    # the database refuses a duplicate among live LoRAs ...
    with pytest.raises(Exception, match="UNIQUE|unique constraint"):
        async with api.gw.db.tx() as conn:
            await loras_store.update_lora(conn, ids[1], trigger_word=words[0])
    # ... but a word may be reused once its LoRA is archived
    assert (await api.client.delete(f"/v2/loras/{ids[0]}", headers=api.h())).status_code == 204
    async with api.gw.db.tx() as conn:
        await loras_store.update_lora(conn, ids[1], trigger_word=words[0])


async def test_a_clashing_draw_is_drawn_again(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uniqueness is the database's (a constraint, not a check before the insert): a word a live
    LoRA holds makes the insert do nothing, and the create draws again."""
    first = (await api.create_lora()).json()["id"]
    async with api.gw.db.read() as conn:
        taken = (await loras_store.get_lora(conn, first)).trigger_word
    draws = iter([taken, taken, "FRESH9"])
    monkeypatch.setattr(lora_service, "generate_trigger_word", lambda: next(draws))
    r = await api.create_lora()
    assert r.status_code == 202, r.text
    async with api.gw.db.read() as conn:
        assert (await loras_store.get_lora(conn, r.json()["id"])).trigger_word == "FRESH9"
    assert next(draws, None) is None  # three draws: two clashed


class RecordingSandbox(SandboxProvider):
    name = "recording"
    prompts: list[str] = []

    async def generate(self, spec, lora):  # type: ignore[override]
        RecordingSandbox.prompts.append(spec.prompt)
        return await super().generate(spec, lora)


class RecordingPlugin:
    @hookimpl
    def register_providers(self, register):
        register(RecordingSandbox)


async def test_prompts_and_captions_carry_the_trigger_word(make_api) -> None:
    RecordingSandbox.prompts = []
    async with make_api(
        plugins=(RecordingPlugin(),),
        providers={"recording": {"training_seconds": 0.1, "queue_seconds": 0}},
        routing={"training": {"providers": ["recording"]}, "inference": {"providers": ["recording"]}},
    ) as api:
        lora = await api.ready_lora()
        word = lora["triggerWord"]
        for prompt in ("on a mountain", f"{word} on a mountain"):
            r = await api.client.post("/v2/images/generate", headers=api.h(), json={
                "prompt": prompt, "model": "flux-lora", "fluxLoraParams": {"loraId": lora["id"]}})
            assert (await api.wait_job(r.json()["jobId"]))["status"] == "COMPLETED"
        assert RecordingSandbox.prompts == [f"{word} on a mountain", f"{word} on a mountain"]
        local = api.gw.storage.local_path(f"loras/{lora['id']}/dataset.zip")
        with zipfile.ZipFile(local) as z:
            names = sorted(z.namelist())
            txts = [z.read(n).decode() for n in names if n.endswith(".txt")]
        assert names[:2] == ["001.jpg", "001.txt"] and len(names) == 30
        assert len(txts) == 15 and all(contains_word(t, word) for t in txts)
