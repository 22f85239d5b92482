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


async def test_a_ready_loras_weights_can_be_taken_out(api: Api, tmp_path) -> None:
    import base64
    import hashlib

    from providers.safetensors import read_header

    r = await api.create_lora(15)
    lora_id = r.json()["id"]
    lora = await api.wait_lora(lora_id)
    assert lora["gateway"]["portable"] is True
    got = await api.client.get(f"/v2/loras/{lora_id}/weights", headers=api.h())
    assert got.status_code == 200, got.text
    digest = hashlib.sha256(got.content).hexdigest()
    assert got.headers["x-weights-sha256"] == digest
    assert got.headers["repr-digest"] == f"sha-256=:{base64.b64encode(bytes.fromhex(digest)).decode()}:"
    assert got.headers["x-weights-key-format"] in ("kohya", "diffusers")
    assert got.headers["x-trigger-word"] == lora["triggerWord"]
    assert int(got.headers["content-length"]) == len(got.content)
    assert got.headers["content-disposition"].startswith('attachment; filename="Ada-') and ".safetensors" in \
        got.headers["content-disposition"]
    path = tmp_path / "w.safetensors"
    path.write_bytes(got.content)
    assert [k for k in read_header(path) if k != "__metadata__"]  # a whole safetensors file, with tensors
    # its own team only; no key, no weights
    _, other = await api.new_team()
    assert (await api.client.get(f"/v2/loras/{lora_id}/weights", headers=api.h(other))).status_code == 404
    assert (await api.client.get(f"/v2/loras/{lora_id}/weights")).status_code == 401
    assert (await api.client.get("/v2/loras/00000000-0000-4000-8000-000000000000/weights",
                                 headers=api.h())).status_code == 404
    assert (await api.client.get("/v2/loras/nope/weights", headers=api.h())).status_code == 400


async def test_weights_wait_until_the_lora_is_ready(make_api) -> None:
    async with make_api(providers={"sandbox": {"training_seconds": 600, "queue_seconds": 0}}) as api:
        r = await api.create_lora(15)
        got = await api.client.get(f"/v2/loras/{r.json()['id']}/weights", headers=api.h())
        assert got.status_code == 409 and "once it is READY" in got.json()["error"]
