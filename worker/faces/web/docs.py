"""`/docs`: the interactive API page (Swagger UI), its script and styles served by this process.

FastAPI's own page loads Swagger UI from a CDN, so on a network without internet it stays blank.
The assets come from the `fastapi-offline` package instead (Swagger UI 5, which reads OpenAPI 3.1,
as FastAPI writes it), mounted under STATIC: the page names only same-origin URLs.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS = "/docs"
STATIC = "/docs/static"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")


def assets_dir() -> Path:
    """The folder of Swagger UI's files as the fastapi-offline wheel installs them."""
    folder = Path(str(resources.files("fastapi_offline") / "static"))
    missing = [name for name in ASSETS if not (folder / name).is_file()]
    if missing:  # a release that moved them: fail at start, not with a blank page
        raise RuntimeError(f"fastapi-offline has no {', '.join(missing)} in {folder}")
    return folder


def install(app: FastAPI) -> None:
    """Serve `/docs` from local files. The app must be made with docs_url=None."""
    app.mount(STATIC, StaticFiles(directory=assets_dir()), name="docs-static")
    redirect = app.swagger_ui_oauth2_redirect_url or f"{DOCS}/oauth2-redirect"

    @app.get(DOCS, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")  # behind a proxy that strips a prefix
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{redirect}",
            swagger_js_url=f"{root}{STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
