"""``/docs`` (Swagger UI) and ``/redoc`` with their JavaScript and CSS served by this server, not a CDN.

The assets come from the ``fastapi-offline`` wheel (Swagger UI and ReDoc bundles, no code of it is used), so
the documentation works offline and the pages load no third-party script. Where that package is missing (a
build that packages only the core dependencies) FastAPI's own CDN pages are kept.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"


def assets_dir() -> Path | None:
    try:
        path = Path(str(importlib.resources.files("fastapi_offline") / "static"))
    except ModuleNotFoundError:
        return None
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def docs_urls(assets: Path | None) -> dict[str, str | None]:
    """``FastAPI(...)`` arguments: no built-in pages when this module serves them."""
    return {"docs_url": None, "redoc_url": None} if assets is not None else {}


def install_docs(app: FastAPI, assets: Path | None) -> None:
    if assets is None:
        return
    app.mount(ASSETS_URL, StaticFiles(directory=assets), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{ASSETS_URL}/favicon.png", with_google_fonts=False)
