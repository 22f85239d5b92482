"""The Gateway: everything one process builds from Settings, in one object on ``app.state``.

``open_gateway`` is used by both the API (in its lifespan) and ``lora-gateway worker``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx
import msgspec
import pluggy
import structlog

from gateway.authcache import AuthCache
from gateway.config import ConfigError, RouteSettings, Settings
from gateway.errors import split_validation_error
from gateway.imagework import ImageWorkers
from gateway.engine.routing import Router
from gateway.health import ProviderHealth
from gateway.metrics import Metrics
from gateway.netsafety import UrlPolicy, webhook_client
from gateway.ratelimit import RateLimiter, SharedRateLimiter
from gateway.signals import Signals
from gateway.signing import UrlSigner
from gateway.store import meta as meta_store
from gateway.store import teams as teams_store
from gateway.store.db import Database, database_for
from gateway.uploads import UploadLimits
from plugins import manager as plugin_manager
from plugins.captioners.base import Captioner
from plugins.storage.base import Storage
from providers.base import Provider, ProviderSetup

log = structlog.get_logger()

MB = 1024 * 1024


@dataclass
class Gateway:
    settings: Settings
    db: Database
    storage: Storage
    captioner: Captioner
    fallback_captioner: Captioner
    providers: dict[str, Provider]
    router: Router
    health: ProviderHealth
    metrics: Metrics
    signer: UrlSigner
    rate_limiter: RateLimiter
    url_policy: UrlPolicy
    webhook_client: httpx.AsyncClient
    auth_cache: AuthCache
    #: the engine's image decoding/encoding: a few low-priority threads, off the event loop
    image_workers: ImageWorkers
    #: wake-ups and cache invalidations every process on the database hears
    signals: Signals

    def wake(self) -> None:
        """New or newly due work for the engines (this process's, and on PostgreSQL every replica's)."""
        self.signals.send("work")

    def wake_deliveries(self) -> None:
        """Webhook deliveries may have been queued (a terminal state, a progress event, a replay)."""
        self.signals.send("deliveries")

    @property
    def upload_limits(self) -> UploadLimits:
        u = self.settings.uploads
        return UploadLimits(
            min_images=u.min_images,
            max_images=u.max_images,
            max_image_bytes=int(u.max_image_mb * MB),
            max_total_bytes=int(u.max_total_mb * MB),
            max_body_bytes=int(u.max_total_mb * MB) + 5 * MB,
            max_image_pixels=u.max_image_pixels,
            decode_pixels=u.pixel_check == "decode",
        )

    @property
    def work_dir(self) -> Path:
        return self.settings.data_path / "work"

    def file_url(self, key: str) -> str:
        return self.signer.sign(key, self.settings.server.file_url_ttl_s)


def _decode_section(type_: type, raw: dict[str, Any], where: str) -> Any:
    try:
        return msgspec.convert(raw or {}, type_, strict=False)
    except msgspec.ValidationError as e:
        path, msg = split_validation_error(e)
        key = f"{where}.{path}" if path else where
        raise ConfigError(f"invalid value for `{key}`: {msg}") from None


async def _signing_secret(db: Database, configured: str | None) -> bytes:
    if configured:
        return configured.encode()
    async with db.tx() as conn:  # the first process to get here makes it; every other reads it
        return bytes.fromhex(await meta_store.put_new(conn, "url_signing_secret", secrets.token_bytes(32).hex()))


class TeamRoutes:
    """A team's own routes (``teams.routing``, set with ``lora-gateway teams set-route``), read from
    the database and kept for a few seconds."""

    TTL_S = 5.0

    def __init__(self, db: Database, providers: dict[str, Provider]) -> None:
        self.db = db
        self.providers = providers
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}

    async def __call__(self, team_id: str) -> dict[str, Any] | None:
        hit = self._cache.get(team_id)
        if hit is not None and time.monotonic() - hit[0] < self.TTL_S:
            return hit[1]
        async with self.db.read() as conn:
            raw = await teams_store.team_routing(conn, team_id)
        routes = None
        if raw:
            routes = {op: msgspec.convert(r, RouteSettings) for op, r in raw.items()}
            # a route naming instances no longer configured keeps those it still can
            for op, r in routes.items():
                kept = [n for n in r.providers if n in self.providers]
                routes[op] = msgspec.structs.replace(r, providers=kept)
            routes = {op: r for op, r in routes.items() if r.providers}
        self._cache[team_id] = (time.monotonic(), routes)
        return routes


@contextlib.asynccontextmanager
async def open_gateway(
    settings: Settings,
    *,
    pm: pluggy.PluginManager | None = None,
    transports: dict[str, httpx.AsyncBaseTransport] | None = None,
) -> AsyncIterator[Gateway]:
    """Open the database, build storage, captioners and providers; close them all on exit."""
    pm = pm or plugin_manager.make_plugin_manager()
    transports = transports or {}
    data_dir = settings.data_path
    data_dir.mkdir(parents=True, exist_ok=True)

    storage_classes = plugin_manager.storages(pm)
    caption_classes = plugin_manager.captioners(pm)
    provider_classes = plugin_manager.providers(pm)
    if settings.storage.backend not in storage_classes:
        raise ConfigError(f"`storage.backend`: unknown backend {settings.storage.backend!r} (have {sorted(storage_classes)})")
    if settings.datasets.captioner not in caption_classes:
        raise ConfigError(f"`datasets.captioner`: unknown captioner {settings.datasets.captioner!r} (have {sorted(caption_classes)})")
    for name, raw in settings.providers.items():
        kind = raw.get("type", name)
        if kind not in provider_classes:
            what = f"type {kind!r}" if "type" in raw else f"{name!r} (and it names no `type`)"
            raise ConfigError(f"`providers.{name}`: no provider plugin is registered as {what} (have {sorted(provider_classes)})")

    def http_client_factory(name: str) -> Callable[..., httpx.AsyncClient]:
        def make(**kwargs: Any) -> httpx.AsyncClient:
            if name in transports:
                kwargs.setdefault("transport", transports[name])
            kwargs.setdefault("timeout", httpx.Timeout(30.0))
            return httpx.AsyncClient(**kwargs)

        return make

    storage_cls = storage_classes[settings.storage.backend]
    storage = storage_cls(_decode_section(storage_cls.config_type, settings.storage.options, "storage.options"), data_dir)

    def make_captioner(name: str) -> Captioner:
        cls = caption_classes[name]
        cfg = _decode_section(cls.config_type, settings.captioners.get(name, {}), f"captioners.{name}")
        return cls(cfg, http_client_factory(f"captioner:{name}"))

    fallback = make_captioner("template")
    captioner = fallback if settings.datasets.captioner == "template" else make_captioner(settings.datasets.captioner)

    db = database_for(settings)
    await db.open(migrate=settings.database.migrate == "auto")
    image_workers = ImageWorkers(settings.engine.image_workers or max(1, (os.cpu_count() or 2) // 2),
                                 nice=settings.engine.image_nice)
    providers: dict[str, Provider] = {}
    try:
        for name, raw in settings.providers.items():
            options = dict(raw)
            cls = provider_classes[options.pop("type", name)]
            cfg = _decode_section(cls.config_type, options, f"providers.{name}")
            setup = ProviderSetup(
                instance=name,
                storage=storage,
                data_dir=data_dir,
                public_base_url=settings.server.public_base_url,
                http_client=http_client_factory(name),
                image_workers=image_workers,
            )
            providers[name] = cls(cfg, setup)
        url_policy = UrlPolicy(settings.webhooks.allow_hosts)
        webhook_http = webhook_client(url_policy, timeout_s=settings.webhooks.timeout_s, transport=transports.get("webhooks"))
        secret = await _signing_secret(db, settings.server.url_signing_secret)
        base_url = settings.server.public_base_url or f"http://{settings.server.host}:{settings.server.port}"
        health = ProviderHealth(db, settings.routing.breaker)
        signals = Signals(db)
        auth_cache = AuthCache(settings.server.auth_cache_s)
        signals.on("auth", auth_cache.clear)  # a key revoked on any replica (or by the CLI)
        gw = Gateway(
            settings=settings,
            db=db,
            storage=storage,
            captioner=captioner,
            fallback_captioner=fallback,
            providers=providers,
            router=Router(providers, settings.routing, health, public=bool(settings.server.public_base_url),
                          team_routes=TeamRoutes(db, providers)),
            health=health,
            metrics=Metrics(),
            signer=UrlSigner(secret, base_url),
            rate_limiter=SharedRateLimiter(db) if db.dialect == "postgresql" else RateLimiter(),
            url_policy=url_policy,
            webhook_client=webhook_http,
            auth_cache=auth_cache,
            image_workers=image_workers,
            signals=signals,
        )
        yield gw
    finally:
        if "signals" in locals():
            await signals.aclose()
        if "webhook_http" in locals():
            await webhook_http.aclose()
        for p in providers.values():
            with contextlib.suppress(Exception):
                await p.aclose()
        for c in {id(captioner): captioner, id(fallback): fallback}.values():
            with contextlib.suppress(Exception):
                await c.aclose()
        await db.close()
        image_workers.close()
