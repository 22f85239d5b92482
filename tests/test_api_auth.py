"""CONTRACTS.md §1.1/§1.2: API keys, request ids, /v2/me, the rate limit, probes, schema, errors."""

from __future__ import annotations

import re
from typing import Any, Callable

import pytest

from gateway.services import accounts
from tests.conftest import Api

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


async def _key_id(api: Api) -> str:
    keys = await accounts.list_keys(api.gw.db, api.team_id)
    assert len(keys) == 1
    return keys[0].id


def _only_error(r: Any, status: int, message: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == message
    assert "details" not in body
    assert r.headers["content-type"].startswith("application/json")


# --------------------------------------------------------------------------- authentication


async def test_missing_key_is_401_api_key_is_required(api: Api) -> None:
    for path in ("/v2/me", "/v2/loras", "/v2/jobs", f"/v2/loras/{'0' * 8}-0000-0000-0000-{'0' * 12}"):
        r = await api.client.get(path)
        _only_error(r, 401, "API key is required")
    r = await api.client.post("/v2/images/generate", json={"prompt": "x"})
    _only_error(r, 401, "API key is required")
    # an empty header is the same as none
    r = await api.client.get("/v2/me", headers={"X-API-Key": ""})
    _only_error(r, 401, "API key is required")


async def test_missing_key_checked_before_the_body(api: Api) -> None:
    r = await api.client.post("/v2/loras", content=b"garbage", headers={"content-type": "text/plain"})
    _only_error(r, 401, "API key is required")
    r = await api.client.post("/v2/images/generate", content=b"{not json")
    _only_error(r, 401, "API key is required")


async def test_unknown_key_is_401_invalid_api_key(api: Api) -> None:
    r = await api.client.get("/v2/me", headers={"X-API-Key": "afk_" + "x" * 40})
    _only_error(r, 401, "Invalid API key")
    r = await api.client.get("/v2/me", headers={"X-API-Key": "not-even-a-key"})
    _only_error(r, 401, "Invalid API key")
    r = await api.client.get("/v2/loras", headers={"Authorization": "Bearer afk_nope"})
    _only_error(r, 401, "Invalid API key")


async def test_revoked_key_is_401_invalid_api_key(api: Api) -> None:
    assert (await api.client.get("/v2/me", headers=api.h())).status_code == 200
    assert await accounts.revoke_key(api.gw.db, await _key_id(api), api.gw.auth_cache)
    r = await api.client.get("/v2/me", headers=api.h())
    _only_error(r, 401, "Invalid API key")
    r = await api.client.get("/v2/loras", headers=api.h())
    _only_error(r, 401, "Invalid API key")


async def test_inactive_key_is_403_and_can_be_reactivated(api: Api) -> None:
    key_id = await _key_id(api)
    assert await accounts.set_key_active(api.gw.db, key_id, False, api.gw.auth_cache)
    r = await api.client.get("/v2/me", headers=api.h())
    _only_error(r, 403, "API key is inactive")
    r = await api.client.post("/v2/images/generate", headers=api.h(), json={})
    _only_error(r, 403, "API key is inactive")
    assert await accounts.set_key_active(api.gw.db, key_id, True, api.gw.auth_cache)
    assert (await api.client.get("/v2/me", headers=api.h())).status_code == 200


async def test_revoked_beats_inactive(api: Api) -> None:
    key_id = await _key_id(api)
    await accounts.set_key_active(api.gw.db, key_id, False, api.gw.auth_cache)
    await accounts.revoke_key(api.gw.db, key_id, api.gw.auth_cache)
    _only_error(await api.client.get("/v2/me", headers=api.h()), 401, "Invalid API key")


async def test_bearer_authorization_works(api: Api) -> None:
    for scheme in ("Bearer", "bearer"):
        r = await api.client.get("/v2/me", headers={"Authorization": f"{scheme} {api.key}"})
        assert r.status_code == 200, r.text
        assert r.json()["team"]["id"] == api.team_id
    # X-API-Key wins when both are sent
    r = await api.client.get("/v2/me", headers={"X-API-Key": api.key, "Authorization": "Bearer afk_wrong"})
    assert r.status_code == 200
    # other schemes are not API keys
    r = await api.client.get("/v2/me", headers={"Authorization": f"Basic {api.key}"})
    _only_error(r, 401, "API key is required")
    r = await api.client.get("/v2/me", headers={"Authorization": "Bearer "})
    _only_error(r, 401, "API key is required")


async def test_key_and_keys_of_another_team_are_independent(api: Api) -> None:
    other_team, other_key = await api.new_team()
    r = await api.client.get("/v2/me", headers=api.h(other_key))
    assert r.status_code == 200 and r.json()["team"]["id"] == other_team != api.team_id


# --------------------------------------------------------------------------- request id


async def test_x_request_id_on_every_response(api: Api) -> None:
    seen = set()
    for method, path, headers in (
        ("GET", "/v2/me", api.h()),
        ("GET", "/v2/me", {}),  # 401
        ("GET", "/healthz", {}),
        ("GET", "/nope", {}),  # 404 from the router
        ("PUT", "/v2/loras", api.h()),  # 405 from the router
        ("GET", "/v2/loras/not-a-uuid", api.h()),  # 400
    ):
        r = await api.client.request(method, path, headers=headers)
        rid = r.headers.get("x-request-id")
        assert rid and re.fullmatch(r"[A-Za-z0-9._-]{1,64}", rid), (path, r.headers)
        assert len(r.headers.get_list("x-request-id")) == 1
        seen.add(rid)
    assert len(seen) == 6  # a fresh id per request


async def test_valid_incoming_request_id_is_echoed(api: Api) -> None:
    r = await api.client.get("/v2/me", headers={**api.h(), "x-request-id": "client-req.42_A"})
    assert r.headers["x-request-id"] == "client-req.42_A"
    r = await api.client.get("/v2/me", headers={"x-request-id": "abc-123"})  # errors too
    assert r.status_code == 401 and r.headers["x-request-id"] == "abc-123"
    r = await api.client.get("/no/such/route", headers={"x-request-id": "abc-404"})
    assert r.status_code == 404 and r.headers.get_list("x-request-id") == ["abc-404"]


@pytest.mark.parametrize("bad", ["has space", "x" * 65, "semi;colon", "a/b"])
async def test_invalid_incoming_request_id_is_replaced(api: Api, bad: str) -> None:
    r = await api.client.get("/v2/me", headers={**api.h(), "x-request-id": bad})
    rid = r.headers["x-request-id"]
    assert rid != bad and re.fullmatch(r"[A-Za-z0-9._-]{1,64}", rid)
    assert len(r.headers.get_list("x-request-id")) == 1


# --------------------------------------------------------------------------- /v2/me


async def test_me_shape(api: Api) -> None:
    r = await api.client.get("/v2/me", headers=api.h())
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"user", "team", "apiKey"}
    assert set(body["user"]) == {"id", "email", "role"}
    assert UUID_RE.match(body["user"]["id"])
    assert body["user"]["email"] is None or isinstance(body["user"]["email"], str)
    assert isinstance(body["user"]["role"], str) and body["user"]["role"]
    assert set(body["team"]) == {"id", "name", "credits", "plan", "customerId"}
    assert body["team"]["id"] == api.team_id
    assert body["team"]["name"] == "test"
    assert body["team"]["credits"] == 10_000 and type(body["team"]["credits"]) is int
    assert isinstance(body["team"]["plan"], str)
    assert body["team"]["customerId"] is None or isinstance(body["team"]["customerId"], str)
    assert set(body["apiKey"]) == {"id", "name", "prefix"}
    assert body["apiKey"]["id"] == await _key_id(api)
    assert body["apiKey"]["name"] == "default"
    prefix = body["apiKey"]["prefix"]
    assert prefix.startswith("afk_") and api.key.startswith(prefix) and len(prefix) < len(api.key)


async def test_me_reflects_credit_changes(api: Api) -> None:
    await accounts.add_credits(api.gw.db, api.team_id, 5, "test")
    assert await api.credits() == 10_005
    await accounts.add_credits(api.gw.db, api.team_id, -10, "test")
    assert await api.credits() == 9_995


async def test_me_with_a_second_key(api: Api) -> None:
    new = await accounts.create_key(api.gw.db, api.team_id, "k2")
    r = await api.client.get("/v2/me", headers=api.h(new.key))
    assert r.status_code == 200
    body = r.json()
    assert body["apiKey"] == {"id": new.record.id, "name": "k2", "prefix": new.key[:8]}
    assert body["team"]["id"] == api.team_id


async def test_the_key_never_appears_in_any_response(api: Api) -> None:
    lora = await api.ready_lora()
    r = await api.client.post(
        "/v2/images/generate", headers=api.h(),
        json={"prompt": "p", "model": "flux-lora", "fluxLoraParams": {"loraId": lora["id"]}},
    )
    assert r.status_code == 202
    job = await api.wait_job(r.json()["jobId"])
    responses = [r]
    for path in ("/v2/me", "/v2/loras", f"/v2/loras/{lora['id']}", "/v2/jobs", f"/v2/jobs/{job['id']}",
                 "/v2/jobs?include_models=true&scope=team", "/schema/openapi.json"):
        responses.append(await api.client.get(path, headers=api.h()))
    responses.append(await api.client.get("/v2/me", headers={"X-API-Key": api.key + "x"}))  # 401
    secret_part = api.key[8:]
    for resp in responses:
        blob = resp.text + " ".join(f"{k}: {v}" for k, v in resp.headers.items())
        assert api.key not in blob and secret_part not in blob, resp.request.url


# --------------------------------------------------------------------------- rate limit


async def test_rate_limit_per_key_429_with_retry_after(make_api: Callable[..., Any]) -> None:
    async with make_api(teams={"rate_limit_per_minute": 3}) as api:
        for _ in range(3):
            assert (await api.client.get("/v2/me", headers=api.h())).status_code == 200
        r = await api.client.get("/v2/me", headers=api.h())
        assert r.status_code == 429, r.text
        assert isinstance(r.json()["error"], str) and r.json()["error"]
        retry = r.headers["Retry-After"]
        assert retry.isdigit() and 1 <= int(retry) <= 60
        # every endpoint behind a key is limited, and it stays limited
        assert (await api.client.get("/v2/loras", headers=api.h())).status_code == 429
        # the bucket is per key: a second key of the same team is not limited yet
        k2 = await accounts.create_key(api.gw.db, api.team_id, "k2")
        assert (await api.client.get("/v2/me", headers=api.h(k2.key))).status_code == 200
        # another team has its own bucket
        _, other = await api.new_team()
        assert (await api.client.get("/v2/me", headers=api.h(other))).status_code == 200
        # probes are not rate limited
        assert (await api.client.get("/healthz")).status_code == 200


async def test_rate_limit_team_override(make_api: Callable[..., Any]) -> None:
    async with make_api(teams={"rate_limit_per_minute": 0}) as api:
        await accounts.set_limits(api.gw.db, api.team_id, max_concurrent_trainings=None, rate_limit_per_minute=2)
        assert (await api.client.get("/v2/me", headers=api.h())).status_code == 200
        assert (await api.client.get("/v2/me", headers=api.h())).status_code == 200
        r = await api.client.get("/v2/me", headers=api.h())
        assert r.status_code == 429 and r.headers["Retry-After"].isdigit()


async def test_unauthenticated_requests_do_not_spend_the_budget(make_api: Callable[..., Any]) -> None:
    async with make_api(teams={"rate_limit_per_minute": 2}) as api:
        for _ in range(5):
            assert (await api.client.get("/v2/me")).status_code == 401
        assert (await api.client.get("/v2/me", headers=api.h())).status_code == 200


# --------------------------------------------------------------------------- probes, schema, errors


async def test_healthz(api: Api) -> None:
    r = await api.client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


async def test_readyz(api: Api) -> None:
    r = await api.client.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["workers"] == "ok"


async def test_readyz_without_workers_needs_an_engine_somewhere(make_api: Callable[..., Any]) -> None:
    """An API-only process is ready only while some engine (a `lora-gateway worker`) beats its
    heartbeat row in the database; with none, it says so (it used to answer 200 regardless)."""
    import anyio

    from gateway.engine.worker import Engine

    async with make_api(server={"run_workers": False}) as api:
        r = await api.client.get("/readyz")
        assert r.status_code == 503, r.text
        checks = r.json()["checks"]
        assert checks["database"] == "ok" and checks["workers"] == "none running"
        assert "lora-gateway worker" in checks["hint"]
        async with anyio.create_task_group() as tg:  # a worker starts against the same database
            await tg.start(Engine(api.gw).run)
            await anyio.sleep(0.1)
            r = await api.client.get("/readyz")
            assert r.status_code == 200, r.text
            assert r.json()["checks"] == {"database": "ok", "workers": "external (1 running)"}
            tg.cancel_scope.cancel()
        r = await api.client.get("/readyz")  # it stopped cleanly: its heartbeat row is gone
        assert r.status_code == 503


async def test_openapi_schema_lists_the_v2_paths(api: Api) -> None:
    r = await api.client.get("/schema/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    paths = set(doc["paths"])
    for p in ("/v2/loras", "/v2/loras/{lora_id}", "/v2/images/generate", "/v2/jobs", "/v2/jobs/{job_id}", "/v2/me"):
        assert p in paths, sorted(paths)
    assert "post" in doc["paths"]["/v2/loras"] and "get" in doc["paths"]["/v2/loras"]
    assert "delete" in doc["paths"]["/v2/loras/{lora_id}"]
    assert not any(p.startswith("/files") for p in paths)


async def test_unknown_route_is_404_json(api: Api) -> None:
    for path in ("/nope", "/v2/nope", "/v3/loras", "/v2/loras/a/b"):
        r = await api.client.get(path, headers=api.h())
        assert r.status_code == 404, (path, r.text)
        assert r.headers["content-type"].startswith("application/json")
        body = r.json()
        assert isinstance(body["error"], str) and body["error"]
        assert "Traceback" not in r.text


async def test_wrong_method_is_405_json(api: Api) -> None:
    r = await api.client.put("/v2/loras", headers=api.h())
    assert r.status_code == 405
    assert isinstance(r.json()["error"], str)


async def test_internal_error_never_leaks_a_traceback(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    async def boom(*_: Any, **__: Any) -> Any:
        raise RuntimeError("secret-internal-detail at /srv/gateway/file.py line 12")

    monkeypatch.setattr(accounts, "me", boom)
    r = await api.client.get("/v2/me", headers=api.h())
    assert r.status_code == 500
    assert r.json() == {"error": "Internal server error", "code": "internal_error"}
    assert "secret-internal-detail" not in r.text and "Traceback" not in r.text
    assert r.headers.get("x-request-id")


def test_auth_cache_expires_and_clears() -> None:
    from gateway.authcache import AuthCache
    from gateway.store.models import ApiKey, Principal

    t = [0.0]
    cache = AuthCache(5.0, clock=lambda: t[0])
    key = ApiKey(id="k", team_id="t", user_id="u", name="n", prefix="afk_x", digest=b"d", active=True,
                 created_at=0.0, revoked_at=None)
    p = Principal(key=key, team_id="t", user_id="u")
    cache.put(b"d", p)
    assert cache.get(b"d") is p
    t[0] = 5.0  # a revoke made by another process (the CLI) applies once the entry expires
    assert cache.get(b"d") is None
    cache.put(b"d", p)
    cache.clear()
    assert cache.get(b"d") is None
    assert AuthCache(0).get(b"d") is None  # 0 = off


async def test_revoked_key_from_another_process_stops_within_the_cache_time(make_api) -> None:
    async with make_api(server={"auth_cache_s": 0}) as api:
        assert (await api.client.get("/v2/me", headers=api.h())).status_code == 200
        key_id = (await api.client.get("/v2/me", headers=api.h())).json()["apiKey"]["id"]
        await accounts.revoke_key(api.gw.db, key_id)  # no cache handed over: like the CLI
        assert (await api.client.get("/v2/me", headers=api.h())).status_code == 401
