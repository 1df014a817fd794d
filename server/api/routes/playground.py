"""The playground: a page at `/` to ask, compare and manage adapters from a browser.

Plain HTML, CSS and JavaScript shipped as package data (`server/static/`), served by the API
process itself: no build step, no other server, nothing fetched from elsewhere (the page's
Content-Security-Policy allows this origin only). The page calls the public API (`/v1/models`,
`/v1/answer`, `/v1/adapters`) with the keys a person types in; they stay in the tab's memory.
The page itself needs no key: it holds no data, only the code that asks for it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import Request, Response

from loraswap.server.api.errors import APIError

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "adapters.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
HEADERS = {
    # Everything comes from this origin; the page cannot be framed by another site.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated on every load, so a new version shows at once
}


@cache
def _read(name: str) -> bytes:
    return (resources.files("loraswap.server") / "static" / name).read_bytes()


def asset_response(name: str) -> Response:
    if name not in ASSETS:
        raise APIError(404, f"no playground file {name!r} (files: {', '.join(ASSETS)})", "not_found_error")
    return Response(_read(name), media_type=ASSETS[name], headers=HEADERS)


async def page(request: Request) -> Response:
    return asset_response("index.html")


async def asset(request: Request, name: str) -> Response:
    try:
        return asset_response(name)
    except APIError as e:
        return e.response()
