"""`/docs` works without internet: Swagger UI's script and styles come from this process.

The first tests read the page through the app as a browser would fetch it. The last one opens it
in a real headless Chromium with every request to another origin refused, and is skipped (with
the reason shown) where Playwright or a Chromium is not installed: CI does not depend on either.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from worker.faces.web.app import create_app
from worker.faces.web.docs import ASSETS, STATIC


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app()) as test_client:
        yield test_client


def _referenced_urls(html: str) -> list[str]:
    """Every URL the page loads or points at: src/href attributes and quoted URLs in its script."""
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    urls += re.findall(r"""url:\s*['"]([^'"]+)['"]""", html)
    urls += re.findall(r"""https?://[^\s'"<>]+""", html)
    return urls


def test_docs_page_names_only_same_origin_urls(client: TestClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    urls = _referenced_urls(html)
    assert f"{STATIC}/swagger-ui-bundle.js" in urls
    assert f"{STATIC}/swagger-ui.css" in urls
    assert "/openapi.json" in urls
    for url in urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, f"{url} is not on this origin"
        assert url.startswith("/") and not url.startswith("//"), url
    assert "cdn" not in html.lower()


@pytest.mark.parametrize(
    ("name", "media_type"),
    [
        ("swagger-ui-bundle.js", "text/javascript"),
        ("swagger-ui.css", "text/css"),
        ("favicon.png", "image/png"),
    ],
)
def test_assets_are_served(client: TestClient, name: str, media_type: str) -> None:
    assert name in ASSETS
    response = client.get(f"{STATIC}/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)
    assert len(response.content) > 1000


def test_bundle_reads_openapi_3_1(client: TestClient) -> None:
    """FastAPI writes OpenAPI 3.1, which Swagger UI renders only from version 5 on."""
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    bundle = client.get(f"{STATIC}/swagger-ui-bundle.js").text
    assert "SwaggerUIBundle" in bundle
    assert "openapi" in bundle and "3.1" in bundle


def test_docs_routes_stay_out_of_the_openapi_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path.startswith("/docs")]
    assert client.get(f"{STATIC}/nothing.js").status_code == 404


# --------------------------------------------------------------------------------------------
# A real browser, with no network beyond this process.

CHROMIUM = (
    os.environ.get("ROOMKEEPER_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def chromium() -> tuple[Any, str]:
    """Playwright's sync API and a Chromium to drive, or a skip naming what is missing."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed (pip install playwright)"
    )
    if CHROMIUM is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set ROOMKEEPER_TEST_CHROMIUM)")
    return sync_api, CHROMIUM


@pytest.fixture
def served() -> Iterator[str]:
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_swagger_ui_renders_in_chromium_without_network(chromium: tuple[Any, str], served: str) -> None:
    sync_api, executable = chromium
    origin = urlsplit(served).netloc
    refused: list[str] = []
    loaded: list[str] = []

    def only_this_origin(route: object) -> None:
        request = route.request  # type: ignore[attr-defined]
        if urlsplit(request.url).netloc == origin:
            loaded.append(request.url)
            route.continue_()  # type: ignore[attr-defined]
        else:
            refused.append(request.url)
            route.abort()  # type: ignore[attr-defined]

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.route("**/*", only_this_origin)
            page.goto(f"{served}/docs")
            page.wait_for_selector(".swagger-ui .info .title", timeout=15_000)
            title = page.inner_text(".swagger-ui .info .title")
            page.wait_for_selector(".opblock", timeout=15_000)
            operations = page.locator(".opblock").count()
            paths = page.locator(".opblock-summary-path").all_inner_texts()
        finally:
            browser.close()
    assert "roomkeeper" in title
    assert operations >= 5
    assert any("/v1/bookings" in path for path in paths)
    assert refused == [], f"the page asked other origins for {refused}"
    assert f"{served}{STATIC}/swagger-ui-bundle.js" in loaded
    assert errors == []
