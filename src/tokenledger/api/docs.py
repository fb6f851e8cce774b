"""``/docs``: Swagger UI from assets shipped in the package (``api/static``, from npm's
swagger-ui-dist), so the page works on a machine with no way out to a CDN."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = "/docs/static"


def install(app: FastAPI) -> None:
    """Serve ``/docs`` and its assets (create the app with ``docs_url=None``)."""
    app.mount(STATIC, StaticFiles(packages=[("tokenledger.api", "static")]),
              name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"),
            title=f"{app.title} — API",
            swagger_js_url=f"{root}{STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC}/favicon-32x32.png",
            oauth2_redirect_url=None)
