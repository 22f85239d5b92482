"""The OpenAPI document names everything a client needs, and the real answers have the shapes it
documents."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from gateway.api import openapi
from tests.conftest import Api


async def document(api: Api) -> dict[str, Any]:
    r = await api.client.get("/schema/openapi.json")
    assert r.status_code == 200
    return r.json()


def operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m, p): op for p, item in doc["paths"].items() for m, op in item.items()
            if m in ("get", "post", "delete", "put", "patch")}


async def test_every_operation_is_described(api: Api) -> None:
    doc = await document(api)
    ops = operations(doc)
    assert set(ops) == set(openapi.OPERATIONS)  # nothing left undescribed, nothing described that is not served
    schemas = doc["components"]["schemas"]
    for (method, path), op in ops.items():
        assert op.get("summary"), (method, path)
        for status, resp in op["responses"].items():
            assert resp["description"], (method, path, status)
            if status == "204":
                continue
            (media, content), = resp["content"].items()
            schema = content["schema"]
            if media == "application/json":
                ref = schema["$ref"].rsplit("/", 1)[1]
                assert ref in schemas, (method, path, status, ref)
                if status.startswith(("4", )):
                    assert ref == "ErrorBody"
        if path.startswith("/v2/"):
            assert op["security"] == [{"ApiKey": []}], (method, path)
            assert {"401", "429"} <= set(op["responses"]), (method, path)
    assert doc["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey", "name": "X-API-Key", "in": "header", "description": openapi.SECURITY_SCHEMES["ApiKey"].description}
    assert doc["components"]["securitySchemes"]["Bearer"]["scheme"] == "bearer"
    error = schemas["ErrorBody"]
    assert set(error["properties"]) >= {"error", "code", "details"} and error["required"] == ["error"]


async def test_request_bodies_and_parameters_are_documented(api: Api) -> None:
    ops = operations(await document(api))
    form = ops[("post", "/v2/loras")]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["images"]["minItems"] == 15 and form["properties"]["images"]["maxItems"] == 30
    assert form["properties"]["images"]["items"]["format"] == "binary"
    assert form["properties"]["subjectKind"]["enum"] == ["person", "style", "object"]
    assert ops[("post", "/v2/images/generate")]["requestBody"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/GenerateImageRequest"}
    names = {p["name"]: p for p in ops[("get", "/v2/jobs")]["parameters"]}
    assert names["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}
    assert names["status"]["schema"]["enum"] == ["QUEUED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED"]
    assert {"Idempotency-Key", "X-Gateway-Provider"} <= {p["name"] for p in ops[("post", "/v2/loras")]["parameters"]}
    assert ops[("get", "/v2/loras/{lora_id}/weights")]["tags"] == ["Extensions"]


def conforms(shape: type, body: Any) -> None:
    """The body decodes into the documented Struct, strictly: no field missing or of another type."""
    msgspec.convert(body, shape, strict=True)


async def test_the_answers_have_the_documented_shapes(api: Api) -> None:
    lora = await api.ready_lora()
    conforms(openapi.LoraView, lora)
    r = await api.create_lora(15)
    conforms(openapi.LoraCreated, r.json())
    conforms(openapi.LoraPage, (await api.client.get("/v2/loras", headers=api.h())).json())
    r = await api.client.post("/v2/images/generate", headers=api.h(), json={
        "prompt": "x", "model": "flux-lora", "fluxLoraParams": {"loraId": lora["id"]}})
    conforms(openapi.JobAccepted, r.json())
    job = await api.wait_job(r.json()["jobId"])
    conforms(openapi.JobView, job)
    conforms(openapi.JobPage, (await api.client.get("/v2/jobs?include_models=true", headers=api.h())).json())
    conforms(openapi.Me, (await api.client.get("/v2/me", headers=api.h())).json())
    conforms(openapi.Providers, (await api.client.get("/v2/providers", headers=api.h())).json())
    conforms(openapi.Attempts, (await api.client.get(f"/v2/jobs/{job['id']}/attempts", headers=api.h())).json())
    conforms(openapi.Usage, (await api.client.get("/v2/usage", headers=api.h())).json())
    conforms(openapi.Health, (await api.client.get("/readyz")).json())
    for bad in [api.client.get("/v2/loras/nope", headers=api.h()), api.client.get("/v2/me"),
                api.client.get("/v2/jobs?limit=0", headers=api.h())]:
        conforms(openapi.ErrorBody, (await bad).json())


@pytest.mark.parametrize("path", ["/schema/swagger", "/schema"])
async def test_the_docs_pages_are_served(api: Api, path: str) -> None:
    assert (await api.client.get(path)).status_code == 200
