"""The app factory: ``create_app(settings)`` builds everything; nothing is global."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import AsyncIterator

import anyio
import httpx
import pluggy
import structlog
from litestar import Litestar
from litestar.openapi import OpenAPIConfig

from gateway import __version__
from gateway.api import admin as admin_api
from gateway.api import docs as docs_api
from gateway.api import openapi
from gateway.api import hooks as hooks_api
from gateway.api import jobs as jobs_api
from gateway.api import loras as loras_api
from gateway.api import providers as providers_api
from gateway.api import system
from gateway.api.errors import EXCEPTION_HANDLERS
from gateway.config import Settings
from gateway.context import open_gateway
from gateway.engine.worker import Engine
from gateway.logging import request_id_middleware
from gateway.uploads import sweep_spool_dirs

log = structlog.get_logger()


def create_app(
    settings: Settings,
    *,
    pm: pluggy.PluginManager | None = None,
    transports: dict[str, httpx.AsyncBaseTransport] | None = None,
) -> Litestar:
    """Build the ASGI app. ``pm`` and ``transports`` let tests inject plugins and fake vendors."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with open_gateway(settings, pm=pm, transports=transports) as gw:
            tmp_root = Path(settings.uploads.tmp_dir) if settings.uploads.tmp_dir else None
            swept = await anyio.to_thread.run_sync(sweep_spool_dirs, tmp_root)
            if swept:  # spool directories of uploads cut short by a killed process
                log.info("upload_spool_swept", count=swept)
            app.state.gw = gw
            app.state.engine = None
            async with anyio.create_task_group() as tg:
                if settings.server.run_workers:
                    engine = Engine(gw)
                    app.state.engine = engine
                    await tg.start(engine.run)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()

    app = Litestar(
        route_handlers=[
            loras_api.LoraController,
            jobs_api.GenerateController,
            jobs_api.JobController,
            system.me,
            system.healthz,
            system.readyz,
            system.files,
            admin_api.AdminController,
            providers_api.ProvidersController,
            providers_api.metrics,
            hooks_api.provider_callback,
            docs_api.docs_asset,
        ],
        lifespan=[lifespan],
        middleware=[request_id_middleware],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        openapi_config=OpenAPIConfig(
            title="lora-gateway",
            version=__version__,
            description="The Apiframe v2 LoRA API, served by a self-hosted gateway in front of pluggable providers.",
            path="/schema",
            render_plugins=docs_api.render_plugins(),
        ),
        debug=False,
    )
    openapi.complete(app)
    return app
