"""Routing: eligibility from capabilities only, the three strategies, health ordering, the
``X-Gateway-Provider`` preference and per-team routes (set through the API's services and the CLI)."""

from __future__ import annotations

import ast
import asyncio
import collections
import random
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import yaml

from gateway.config import BreakerSettings, RouteSettings, RoutingSettings
from gateway.engine.routing import InferenceNeeds, Router, TrainingNeeds, rendezvous
from gateway.health import ProviderHealth
from gateway.services import accounts
from gateway.store.sqlite import SqliteDatabase as Database
from providers.base import Capabilities, Cost, InferenceCapabilities, TrainingCapabilities
from tests.test_routing_matrix import ENGINE, attempts

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class P:
    """Just what the router reads of a provider: its instance name and capabilities."""

    name: str
    capabilities: Capabilities


def caps(*, training: dict[str, Any] | None = None, inference: dict[str, Any] | None = None,
         cost: tuple[float, float] = (0.0, 0.0), train: bool = True, infer: bool = True) -> Capabilities:
    return Capabilities(
        training=TrainingCapabilities(**(training or {})) if train else None,
        inference=InferenceCapabilities(**(inference or {})) if infer else None,
        cost=Cost(per_training=cost[0], per_image=cost[1]))


@pytest.fixture
async def health(tmp_path: Path) -> AsyncIterator[ProviderHealth]:
    db = Database(tmp_path / "gw.db")
    await db.open()
    yield ProviderHealth(db, BreakerSettings(failures=2, cooldown_s=60))
    await db.close()


def router(health: ProviderHealth, providers: list[P], *, training: dict[str, Any] | None = None,
           inference: dict[str, Any] | None = None, public: bool = False) -> Router:
    names = [p.name for p in providers]
    routing = RoutingSettings(training=RouteSettings(**(training or {"providers": names})),
                              inference=RouteSettings(**(inference or {"providers": names})))
    return Router({p.name: p for p in providers}, routing, health, public=public)  # type: ignore[misc]


def t_needs(**kw: Any) -> TrainingNeeds:
    return TrainingNeeds(**{"subject_kind": "person", "steps": 1000, "rank": 16, "key": "lora-1", **kw})


def i_needs(**kw: Any) -> InferenceNeeds:
    return InferenceNeeds(**{"num_outputs": 1, "aspect_ratio": "1:1", "portable": True, "trained_by": "trainer",
                             "key": "job-1", **kw})


def names(ps: list[Any]) -> list[str]:
    return [p.name for p in ps]


# --------------------------------------------------------------------------- strategies


def ids(n: int, seed: int = 7) -> list[str]:
    rnd = random.Random(seed)
    return [str(uuid.UUID(int=rnd.getrandbits(128), version=4)) for _ in range(n)]


def test_weighted_split_over_1000_ids_follows_the_weights() -> None:
    weights = {"a": 1, "b": 2, "c": 7}
    first = collections.Counter(rendezvous(i, ["a", "b", "c"], weights)[0] for i in ids(1000))
    for name, w in weights.items():
        assert abs(first[name] / 1000 - w / 10) <= 0.03, first
    two = collections.Counter(rendezvous(i, ["x", "y"], {"x": 3})[0] for i in ids(1000, seed=8))  # y: 1 (unlisted)
    assert abs(two["x"] / 1000 - 0.75) <= 0.03, two


def test_weighted_order_is_stable_and_removing_one_moves_only_its_share() -> None:
    keys = ids(300)
    before = {k: rendezvous(k, ["a", "b", "c"], {"c": 2}) for k in keys}
    assert before == {k: rendezvous(k, ["c", "a", "b"], {"c": 2}) for k in keys}  # listing order is irrelevant
    after = {k: rendezvous(k, ["a", "b"], {}) for k in keys}
    for k in keys:
        if before[k][0] != "c":
            assert after[k][0] == before[k][0]  # only c's objects move
        assert after[k] == [n for n in before[k] if n != "c"]


async def test_cheapest_orders_by_declared_cost_ties_by_route_order(health: ProviderHealth) -> None:
    ps = [P("dear", caps(cost=(2.0, 0.05))), P("cheap-1", caps(cost=(1.0, 0.01))), P("cheap-2", caps(cost=(1.0, 0.01))),
          P("mid", caps(cost=(1.5, 0.001)))]
    r = router(health, ps, training={"strategy": "cheapest", "providers": ["dear", "cheap-2", "cheap-1", "mid"]},
               inference={"strategy": "cheapest", "providers": ["dear", "cheap-2", "cheap-1", "mid"]})
    assert names(await r.training_order(t_needs())) == ["cheap-2", "cheap-1", "mid", "dear"]
    assert names(await r.inference_order(i_needs(num_outputs=4))) == ["mid", "cheap-2", "cheap-1", "dear"]


async def test_priority_keeps_the_route_order_and_health_puts_open_breakers_last(health: ProviderHealth) -> None:
    ps = [P("a", caps()), P("b", caps()), P("c", caps())]
    r = router(health, ps, training={"providers": ["b", "a", "c"]})
    assert names(await r.training_order(t_needs())) == ["b", "a", "c"]
    for _ in range(2):
        await health.record("b", "training", ok=False)
    health._read_at = -1  # (no waiting for the half-second cache in a unit test)
    assert names(await r.training_order(t_needs())) == ["a", "c", "b"]
    assert names(await r.inference_order(i_needs())) == ["a", "b", "c"]  # the inference breaker is closed


async def test_a_preferred_instance_goes_first_when_eligible_and_healthy(health: ProviderHealth) -> None:
    ps = [P("a", caps()), P("b", caps(training={"max_steps": 1000}))]
    r = router(health, ps)
    assert names(await r.training_order(t_needs(preferred="b"))) == ["b", "a"]
    assert names(await r.training_order(t_needs(preferred="b", steps=2000))) == ["a"]  # b is not eligible
    for _ in range(2):
        await health.record("b", "training", ok=False)
    health._read_at = -1
    assert names(await r.training_order(t_needs(preferred="b"))) == ["a", "b"]  # b is not healthy


# --------------------------------------------------------------------------- eligibility


async def test_training_eligibility_comes_from_capabilities(health: ProviderHealth) -> None:
    ps = [
        P("styles-only", caps(training={"subject_kinds": frozenset({"style"})})),
        P("short", caps(training={"max_steps": 800})),
        P("low-rank", caps(training={"max_rank": 8})),
        P("own-rank", caps(training={"max_rank": 8, "rank_controllable": False})),  # it picks the rank: fine
        P("wants-url", caps(training={"dataset_input": "zip_url"})),  # needs a public gateway URL
        P("no-training", caps(train=False)),
        P("any", caps()),
    ]
    assert names(await router(health, ps).training_order(t_needs())) == ["own-rank", "any"]
    assert names(await router(health, ps, public=True).training_order(t_needs())) == ["own-rank", "wants-url", "any"]
    assert names(await router(health, ps).training_order(t_needs(subject_kind="style", steps=600, rank=8))) == [
        "styles-only", "short", "low-rank", "own-rank", "any"]


async def test_inference_eligibility_comes_from_capabilities(health: ProviderHealth) -> None:
    ps = [
        P("trainer", caps(inference={"accepts_lora_file": False})),  # runs only its own LoRAs
        P("one-image", caps(inference={"max_outputs": 1})),
        P("square-only", caps(inference={"aspect_ratios": frozenset({"1:1"})})),
        P("kohya-only", caps(inference={"lora_formats": frozenset({"kohya"})})),
        P("local-files", caps(inference={"weights_access": "local_file"})),
        P("public-urls", caps(inference={"weights_access": "public_url"})),
        P("no-inference", caps(infer=False)),
        P("any", caps()),
    ]
    r = router(health, ps)
    assert names(await r.inference_order(i_needs(artifact_format="diffusers"))) == ["trainer", "one-image", "square-only", "any"]
    assert names(await r.inference_order(i_needs(num_outputs=2, aspect_ratio="16:9", artifact_format="kohya",
                                                 weights_local=True))) == ["trainer", "kohya-only", "local-files", "any"]
    assert "public-urls" in names(await router(health, ps, public=True).inference_order(i_needs()))
    # a LoRA whose weights stayed with the vendor runs only where it was trained
    assert names(await r.inference_order(i_needs(portable=False))) == ["trainer"]
    assert names(await r.inference_order(i_needs(portable=False, trained_by="any"))) == ["any"]


async def test_instances_honouring_every_set_parameter_go_first(health: ProviderHealth) -> None:
    ps = [P("ignores-seed", caps(inference={"honours": frozenset({"num_outputs", "aspect_ratio"})})), P("all", caps())]
    r = router(health, ps)
    assert names(await r.inference_order(i_needs(set_params=frozenset({"seed"})))) == ["all", "ignores-seed"]
    assert names(await r.inference_order(i_needs(set_params=frozenset({"num_outputs"})))) == ["ignores-seed", "all"]


def test_routing_and_engine_code_never_test_a_provider_name_or_type() -> None:
    """Eligibility is capabilities only: no string literal naming a provider type in the code
    that routes or runs attempts (docstrings aside)."""
    types = {"sandbox", "wavespeed", "vimmerse", "local"}
    files = [*sorted((ROOT / "gateway" / "engine").glob("*.py")), ROOT / "gateway" / "health.py"]
    for path in files:
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert node.value.lower() not in types, f"{path.name}:{node.lineno} tests for {node.value!r}"


# --------------------------------------------------------------------------- through the API

TWO = {"sb-1": {"type": "sandbox", "training_seconds": 0.2, "queue_seconds": 0.05},
       "sb-2": {"type": "sandbox", "training_seconds": 0.2, "queue_seconds": 0.05}}
ROUTES = {"training": {"providers": ["sb-1", "sb-2"]}, "inference": {"providers": ["sb-1", "sb-2"]}}


async def generate(api: Any, lora_id: str, *, key: str | None = None, headers: dict[str, str] | None = None) -> Any:
    return await api.client.post("/v2/images/generate", headers={**api.h(key), **(headers or {})}, json={
        "prompt": "a portrait", "model": "flux-lora", "fluxLoraParams": {"loraId": lora_id}})


async def test_x_gateway_provider(make_api: Callable[..., Any]) -> None:
    async with make_api(providers=TWO, routing=ROUTES, engine=ENGINE) as api:
        from tests.images import image_set, multipart_files

        r = await api.client.post("/v2/loras", headers={**api.h(), "X-Gateway-Provider": "sb-2"},
                                  data={"name": "Ada", "subjectKind": "person", "gender": "female", "ethnicity": "east asian"}, files=multipart_files(image_set(15)))
        assert r.status_code == 202, r.text
        lora = await api.wait_lora(r.json()["id"])
        assert [a["provider"] for a in await attempts(api, "loras", lora["id"])] == ["sb-2"]
        job = await api.wait_job((await generate(api, lora["id"], headers={"X-Gateway-Provider": "sb-1"})).json()["jobId"])
        assert [a["provider"] for a in await attempts(api, "jobs", job["id"])] == ["sb-1"]
        job = await api.wait_job((await generate(api, lora["id"])).json()["jobId"])
        assert [a["provider"] for a in await attempts(api, "jobs", job["id"])] == ["sb-1"]  # the route's first
        # an unhealthy preference is not honoured
        for _ in range(api.gw.settings.routing.breaker.failures):
            await api.gw.health.record("sb-2", "inference", ok=False)
        job = await api.wait_job((await generate(api, lora["id"], headers={"X-Gateway-Provider": "sb-2"})).json()["jobId"])
        assert [a["provider"] for a in await attempts(api, "jobs", job["id"])] == ["sb-1"]
        bad = await generate(api, lora["id"], headers={"X-Gateway-Provider": "nope"})
        assert bad.status_code == 400 and "X-Gateway-Provider" in bad.text and "sb-1, sb-2" in bad.text


async def test_the_engine_spreads_weighted_work_by_id(make_api: Callable[..., Any]) -> None:
    routes = {"inference": {"strategy": "weighted", "providers": ["sb-1", "sb-2"], "weights": {"sb-1": 3}}}
    async with make_api(providers=TWO, routing=routes, engine=ENGINE) as api:
        lora = await api.ready_lora()
        got = collections.Counter()
        for _ in range(24):
            job = await api.wait_job((await generate(api, lora["id"])).json()["jobId"])
            (attempt,) = await attempts(api, "jobs", job["id"])
            # trained on "sandbox" (the default training route): a candidate too, weight 1
            assert attempt["provider"] == rendezvous(job["id"], ["sb-1", "sb-2", "sandbox"], {"sb-1": 3})[0]
            got[attempt["provider"]] += 1
        assert got["sb-1"] > got["sb-2"]


async def test_a_team_route_overrides_the_configured_one(make_api: Callable[..., Any]) -> None:
    async with make_api(providers=TWO, routing=ROUTES, engine=ENGINE) as api:
        other, other_key = await api.new_team()
        routes = await accounts.set_route(api.gw.db, other, "training", RouteSettings(providers=["sb-2"]),
                                          api.gw.settings.providers)
        assert routes == {"training": {"strategy": "priority", "providers": ["sb-2"], "weights": {}}}
        mine = await api.ready_lora()
        r = await api.create_lora(15, key=other_key)
        theirs = await api.wait_lora(r.json()["id"], key=other_key)
        assert [a["provider"] for a in await attempts(api, "loras", mine["id"])] == ["sb-1"]
        got = await api.client.get(f"/v2/loras/{theirs['id']}/attempts", headers=api.h(other_key))
        assert [a["provider"] for a in got.json()["attempts"]] == ["sb-2"]
        # another team's attempts are not visible
        assert (await api.client.get(f"/v2/loras/{theirs['id']}/attempts", headers=api.h())).status_code == 404
        with pytest.raises(Exception, match="not configured"):
            await accounts.set_route(api.gw.db, other, "training", RouteSettings(providers=["ghost"]),
                                     api.gw.settings.providers)


async def run_cli(*args: str) -> tuple[int, str, str]:
    """``lora-gateway ...`` in its own process."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.cli", *args, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_teams_set_route_cli(make_api: Callable[..., Any], tmp_path: Path) -> None:
    async with make_api(providers=TWO, routing=ROUTES, engine=ENGINE) as api:
        config = tmp_path / "gateway.yaml"
        config.write_text(yaml.safe_dump({"data_dir": str(api.gw.settings.data_path), "providers": TWO, "routing": ROUTES,
                                          "database": {"url": api.gw.settings.database.url}}))
        other, other_key = await api.new_team()
        base = ["teams", "set-route", other, "-c", str(config)]
        code, out, err = await run_cli(*base, "--operation", "inference", "--strategy", "weighted",
                                       "--providers", "sb-2,sb-1", "--weights", "sb-2=1000")
        assert code == 0, err
        assert "inference: weighted sb-2,sb-1 sb-2=1000" in out
        code, out, err = await run_cli(*base, "--operation", "training", "--providers", "ghost")
        assert code == 1 and "names `ghost`, which is not configured" in err
        code, out, err = await run_cli(*base, "--operation", "training", "--providers", "sb-1", "--weights", "sb-1=x")
        assert code != 0 and "name=number" in err
        code, out, err = await run_cli(*base, "--operation", "inference", "--providers", "sb-2,sb-1")  # priority
        assert code == 0 and "inference: priority sb-2,sb-1" in out, err
        code, out, _ = await run_cli("teams", "list", "-c", str(config))
        assert '"inference":{"strategy":"priority","providers":["sb-2","sb-1"]' in out
        r = await api.create_lora(15, key=other_key)
        lora = await api.wait_lora(r.json()["id"], key=other_key)
        job = (await generate(api, lora["id"], key=other_key)).json()
        await api.wait_job(job["jobId"], key=other_key)
        got = await api.client.get(f"/v2/jobs/{job['jobId']}/attempts", headers=api.h(other_key))
        assert [a["provider"] for a in got.json()["attempts"]] == ["sb-2"]
        code, out, _ = await run_cli(*base, "--operation", "inference", "--clear")
        assert code == 0 and "the gateway's defaults" in out
        async with api.gw.db.read() as conn:
            rows = await conn.execute_fetchall("SELECT routing FROM teams WHERE id = ?", (other,))
        assert [tuple(r) for r in rows] == [(None,)]


async def test_the_readme_two_vendor_example_is_a_working_config(tmp_path: Path) -> None:
    from gateway.config import settings_from_mapping
    from gateway.context import open_gateway

    text = (ROOT / "README.md").read_text()
    block = text.split("```yaml\n# two-vendor example\n", 1)[1].split("```", 1)[0]
    mapping = yaml.safe_load(block)
    mapping["data_dir"] = str(tmp_path / "data")
    env = {name: "x" for name in ("WS_MAIN_KEY", "WS_MAIN_WEBHOOK_SECRET", "WS_BACKUP_KEY", "VIMMERSE_API_KEY",
                                  "LORA_GATEWAY_METRICS_TOKEN")}
    settings = settings_from_mapping(mapping, env=env)
    async with open_gateway(settings) as gw:
        assert set(gw.providers) == {"ws-main", "ws-backup", "vimmerse"}
        assert [type(p).name for p in gw.providers.values()] == ["wavespeed", "wavespeed", "vimmerse"]
        lora = await gw.router.training_order(t_needs(key="x"))
        assert names(lora) == ["ws-main", "vimmerse"]
        cheapest = await gw.router.inference_order(i_needs(trained_by="ws-main", artifact_format="diffusers"))
        assert names(cheapest) == ["ws-main", "ws-backup"]
        # a Vimmerse LoRA (weights stay there) generates only on Vimmerse
        assert names(await gw.router.inference_order(i_needs(trained_by="vimmerse", portable=False))) == ["vimmerse"]
