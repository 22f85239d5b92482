"""The API docs work offline: Swagger UI and ReDoc load nothing but the gateway's own assets,
and, in a real headless Chromium that may reach nothing but 127.0.0.1, they list the operations."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.conftest import Api
from tests.crash_harness import GatewayProcess, _free_port, wait_until_ready

URL_RE = re.compile(r"""(?:src|href)\s*=\s*['"]([^'"]+)['"]|url\(\s*['"]?([^'")]+)""")
PAGES = ["/schema", "/schema/swagger", "/schema/redoc"]


@pytest.mark.parametrize("page", PAGES)
async def test_the_docs_pages_load_only_the_gateways_own_assets(api: Api, page: str) -> None:
    r = await api.client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    refs = [a or b for a, b in URL_RE.findall(r.text)]
    assert refs, "the page loads its assets from somewhere"
    assert not [u for u in refs if re.match(r"(https?:)?//", u)], refs  # no CDN, no web fonts
    for ref in refs:
        got = await api.client.get(ref)
        assert got.status_code == 200 and len(got.content) > 100, ref


async def test_only_the_listed_assets_are_served(api: Api) -> None:
    assert (await api.client.get("/docs-assets/swagger-ui-bundle.js")).headers["content-type"].startswith("text/javascript")
    for name in ("nope.js", "index.html", "..%2F__init__.py", "%2E%2E%2Fredoc%2Fvendor%2Findex.html"):
        assert (await api.client.get(f"/docs-assets/{name}")).status_code == 404, name


# --------------------------------------------------------------------------- in a browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "logging": {"level": "warning"}}))
    gw = GatewayProcess(cfg, _free_port(), tmp_path)
    gw.start()
    try:
        wait_until_ready([gw])
        yield gw.base
    finally:
        gw.stop()


def _dom(url: str, tmp_path: Path) -> str:
    chromium = _chromium()
    assert chromium is not None
    out = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'chromium-profile'}",
         # nothing but this machine: a page that needed a CDN would come up empty
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
         "--virtual-time-budget=15000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (scripts/test.sh installs Debian's chromium)")
def test_swagger_ui_and_redoc_list_the_operations_in_a_headless_browser(served: str, tmp_path: Path) -> None:
    swagger = _dom(f"{served}/schema/swagger", tmp_path)
    paths = set(re.findall(r'data-path="([^"]+)"', swagger)) or set(
        re.findall(r'class="opblock-summary-path"[^>]*>(?:<a[^>]*>)?(?:<span>)?([^<]+)', swagger))
    assert {"/v2/loras", "/v2/images/generate", "/v2/jobs/{job_id}"} <= {p.replace("\u200b", "") for p in paths}, \
        swagger[:3000]
    redoc = _dom(f"{served}/schema", tmp_path)
    assert "Create a LoRA" in redoc and "Generate images with a LoRA" in redoc, redoc[:3000]
