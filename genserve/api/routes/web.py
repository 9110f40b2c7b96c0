"""The web UI: one static page and its ES modules, served from the installed package.

The page is a client of the public API only (`/v1/...`); nothing here is private to it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

router = APIRouter(include_in_schema=False)

# Revalidate every time (a cheap 304 with the ETag), so an upgraded server never runs stale JS.
NO_CACHE = {"Cache-Control": "no-cache"}


class WebAssets(StaticFiles):
    """`genserve/web/` from the package, wherever it is installed, with revalidation headers."""

    def __init__(self) -> None:
        super().__init__(packages=[("genserve", "web")])

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(NO_CACHE)
        return response

    def index_path(self) -> Path:
        return Path(self.all_directories[0]) / "index.html"


assets = WebAssets()
router.mount("/static", assets, name="static")


@router.api_route("/", methods=["GET", "HEAD"], response_class=FileResponse)
def index() -> FileResponse:
    """The page: prompt form, live progress and the gallery."""
    return FileResponse(assets.index_path(), media_type="text/html", headers=NO_CACHE)
