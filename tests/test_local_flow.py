"""The whole Apiframe flow with ``provider: local`` (tiny FLUX, CPU), in-process.

The API asks for at least 500 steps; the provider's ``max_steps: 4`` caps what really runs.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from PIL import Image  # noqa: E402

from tests.tiny_flux import T5_MAX_LENGTH, tiny_flux  # noqa: E402,F401
FIXTURES = (tiny_flux,)  # pytest fixtures, imported to be found (and seen as used)


async def test_full_flow_on_the_local_provider(make_api: Callable[..., Any], tiny_flux: Path) -> None:
    local = {"model_dir": str(tiny_flux), "devices": ["cpu"], "max_steps": 4, "checkpoint_every": 2,
             "resolution": 32, "max_sequence_length": T5_MAX_LENGTH, "learning_rate": 1e-2}
    async with make_api(providers={"local": local},
                        routing={"training": {"providers": ["local"]}, "inference": {"providers": ["local"]}}) as api:
        start = await api.credits()
        r = await api.create_lora(15, steps=500, loraRank=8)
        assert r.status_code == 202, r.text
        lora = await api.wait_lora(r.json()["id"], timeout=240)
        assert lora["status"] == "READY", lora
        assert lora["isReady"] and lora["hasWeights"]
        provider = api.gw.providers["local"]
        job = provider.runner.load(provider.runner.launched[0])
        assert (job.requested_steps, job.steps, job.rank, job.team_id) == (500, 4, 8, api.team_id)

        r = await api.client.post(
            "/v2/images/generate", headers=api.h(),
            json={"prompt": "a portrait in a garden", "model": "flux-lora",
                  "fluxLoraParams": {"loraId": lora["id"], "num_outputs": 1, "aspect_ratio": "16:9",
                                     "output_format": "webp", "num_inference_steps": 4, "seed": 5}},
        )
        assert r.status_code == 202, r.text
        job = await api.wait_job(r.json()["jobId"], timeout=120)
        assert job["status"] == "COMPLETED", job
        urls = job["result"]["images"]
        assert len(urls) == 1
        got = await api.client.get("/" + urls[0].split("://", 1)[1].split("/", 1)[1])
        assert got.status_code == 200
        img = Image.open(io.BytesIO(got.content))
        assert img.format == "WEBP" and img.size == (1280, 720)
        assert await api.credits() == start - 2 - 255 - 2
