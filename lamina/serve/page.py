"""The chat page at `/`: plain HTML, CSS and JavaScript shipped in the package (lamina/serve/static), no build step,
nothing fetched from another site. The page talks to /v1/chat/completions like any client; its Content-Security-Policy
allows scripts, styles and connections from this server only, and no inline script at all, so text that reached the
page as HTML could still not run (the page never inserts model output as HTML in the first place)."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.exceptions import HTTPException

router = APIRouter()

_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "chat.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a new lamina's page is picked up at the next load
}


@cache
def _asset(name: str) -> bytes:
    return resources.files("lamina.serve").joinpath("static", name).read_bytes()


def _file(name: str) -> Response:
    return Response(_asset(name), media_type=_TYPES[name], headers=_HEADERS)


@router.get("/", include_in_schema=False)
async def index():
    """The chat page."""
    return _file("index.html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str):
    """The page's script, style sheet and icon; nothing else in the package is served."""
    if name not in _TYPES:
        raise HTTPException(404, f"no such file: /static/{name}")
    return _file(name)
