"""The API docs' own assets: Swagger UI (``/schema/swagger``) and ReDoc (``/schema``,
``/schema/redoc``) load their scripts and styles from the gateway, out of the
``openapi-ui-bundles`` package, never from a CDN, so the docs work offline and behind a strict
proxy, where self-hosted gateways run."""

from __future__ import annotations

from pathlib import Path

import openapi_ui_bundles
from litestar import get
from litestar.openapi.plugins import RedocRenderPlugin, SwaggerRenderPlugin
from litestar.response import File

from gateway.errors import NotFound

ASSETS_PATH = "/docs-assets"

#: the files served, by name: nothing else under the packages' folders is reachable
ASSETS: dict[str, tuple[Path, str]] = {
    "swagger-ui-bundle.js": (openapi_ui_bundles.swagger_ui.static_path, "text/javascript"),
    "swagger-ui-standalone-preset.js": (openapi_ui_bundles.swagger_ui.static_path, "text/javascript"),
    "swagger-ui.css": (openapi_ui_bundles.swagger_ui.static_path, "text/css"),
    "favicon-32x32.png": (openapi_ui_bundles.swagger_ui.static_path, "image/png"),
    "redoc.standalone.js": (openapi_ui_bundles.redoc.static_path, "text/javascript"),
}

_FAVICON = f"<link rel='icon' type='image/png' href='{ASSETS_PATH}/favicon-32x32.png'>"


@get(f"{ASSETS_PATH}/{{name:str}}", include_in_schema=False, sync_to_thread=False)
def docs_asset(name: str) -> File:
    try:
        folder, media_type = ASSETS[name]
    except KeyError:
        raise NotFound("No such docs asset") from None
    return File(folder / name, media_type=media_type, content_disposition_type="inline",
                headers={"cache-control": "public, max-age=86400"})


def render_plugins() -> list:
    return [
        RedocRenderPlugin(path=["/", "/redoc"], js_url=f"{ASSETS_PATH}/redoc.standalone.js", google_fonts=False,
                          favicon=_FAVICON),
        SwaggerRenderPlugin(path="/swagger", js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
                            css_url=f"{ASSETS_PATH}/swagger-ui.css",
                            standalone_preset_js_url=f"{ASSETS_PATH}/swagger-ui-standalone-preset.js",
                            favicon=_FAVICON),
    ]
