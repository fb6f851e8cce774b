"""The API's documents: ``/docs``, Swagger UI from assets shipped in the package
(``api/static``, from npm's swagger-ui-dist), so the page works on a machine with no way
out to a CDN; and the route table of docs/api.md, generated from the OpenAPI document
(``python -m tokenledger.api.docs docs/api.md``; a test fails when the file is stale)."""

from __future__ import annotations

from typing import Any

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
            oauth2_redirect_url=None,
            # Swagger UI would otherwise fetch a validity badge from swagger.io.
            swagger_ui_parameters={"validatorUrl": None})


# -- docs/api.md ------------------------------------------------------------------------------

# The routes the reference services (shared/seeds) define: their shapes are kept exactly,
# whatever the convention below says. Every other route follows docs/api.md.
SEED_ROUTES = frozenset({
    ("GET", "/api/billing/balance"), ("GET", "/api/billing/transactions"),
    ("GET", "/api/billing/wallets"), ("POST", "/api/billing/wallets"),
    ("GET", "/api/billing/daily-reset"), ("POST", "/api/billing/daily-reset"),
    ("POST", "/api/token-process/start"), ("POST", "/api/token-process/end"),
})
BEGIN_TABLE = "<!-- routes: generated from the OpenAPI document; see tokenledger.api.docs -->"
END_TABLE = "<!-- /routes -->"


def route_table(schema: dict[str, Any]) -> str:
    """The route → method → scope → summary table of docs/api.md, from ``schema``."""
    lines = ["| route | method | scope | shape | summary |", "| --- | --- | --- | --- | --- |"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            scopes = operation.get("x-scopes", [])
            summary = operation.get("summary", "")
            summary = summary.rsplit(" (", 1)[0] if summary.endswith(")") else summary
            shape = "seed" if (method.upper(), path) in SEED_ROUTES else "convention"
            scope = " or ".join(scopes) if scopes else "public"
            lines.append(f"| `{path}` | {method.upper()} | {scope} | {shape} | "
                         f"{summary.replace('|', '∣')} |")
    return "\n".join(lines)


def with_table(document: str, table: str) -> str:
    """``document`` with the text between its table markers replaced by ``table``."""
    head, _, rest = document.partition(BEGIN_TABLE)
    _, _, tail = rest.partition(END_TABLE)
    return f"{head}{BEGIN_TABLE}\n{table}\n{END_TABLE}{tail}"


def main(argv: list[str]) -> None:
    """``python -m tokenledger.api.docs docs/api.md``: rewrite the file's route table."""
    from tokenledger.api.app import create_app
    from tokenledger.config import Settings

    (target,) = argv
    table = route_table(create_app(Settings()).openapi())
    with open(target, encoding="utf-8") as f:
        document = f.read()
    with open(target, "w", encoding="utf-8") as f:
        f.write(with_table(document, table))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
