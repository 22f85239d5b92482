"""The whole Apiframe flow on the sandbox provider, in-process."""

from __future__ import annotations

import io

from PIL import Image

from tests.conftest import Api


async def test_full_flow_create_train_generate_download(api: Api) -> None:
    start = await api.credits()
    r = await api.create_lora(18)
    assert r.status_code == 202, r.text
    created = r.json()
    assert created["status"] == "PENDING" and created["imageCount"] == 18
    lora = await api.wait_lora(created["id"])
    assert lora["status"] == "READY", lora
    assert lora["isReady"] and lora["hasWeights"]
    word = lora["triggerWord"]
    assert word and len(word) == 5

    r = await api.client.post(
        "/v2/images/generate",
        headers=api.h(),
        json={"prompt": "a portrait in a garden", "model": "flux-lora",
              "fluxLoraParams": {"loraId": lora["id"], "num_outputs": 2, "aspect_ratio": "3:4", "output_format": "webp"}},
    )
    assert r.status_code == 202, r.text
    job = await api.wait_job(r.json()["jobId"])
    assert job["status"] == "COMPLETED", job
    assert job["creditCost"] == 4 and job["progress"] == 100
    urls = job["result"]["images"]
    assert len(urls) == 2
    for url in urls:
        path = url.split("://", 1)[1].split("/", 1)[1]
        got = await api.client.get("/" + path)
        assert got.status_code == 200
        img = Image.open(io.BytesIO(got.content))
        assert img.format == "WEBP" and img.size == (864, 1152)
    assert await api.credits() == start - 2 - 255 - 4
