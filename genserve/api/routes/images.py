"""Generated images, served from the image store."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse, Response

from genserve.api.compat import MEDIA_TYPES, ImageFormat, convert_image
from genserve.api.deps import ServicesDep
from genserve.auth.deps import PrincipalDep

router = APIRouter(tags=["images"])


@router.get(
    "/v1/images/{image_id}",
    operation_id="get_image",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}, "description": "The PNG, with its generation parameters"}},
)
def get_image(
    image_id: str,
    services: ServicesDep,
    principal: PrincipalDep,
    format: Annotated[ImageFormat, Query(description="png (with parameters), jpeg or webp")] = "png",
    quality: Annotated[int | None, Query(ge=0, le=100, description="JPEG/WebP quality")] = None,
) -> Response:
    try:
        path = services.images.path(image_id)
    except ValueError:
        raise HTTPException(404, f"image {image_id} not found") from None
    job = services.store.get(image_id.rpartition("-")[0]) if principal.authenticated else None
    if not path.is_file() or (principal.authenticated and (job is None or not principal.owns(job))):
        raise HTTPException(404, f"image {image_id} not found")
    # With API keys, an image belongs to one key: no shared cache may keep it.
    scope = "private" if principal.authenticated else "public"
    headers = {"Cache-Control": f"{scope}, max-age=31536000, immutable"}
    if format == "png":
        return FileResponse(path, media_type="image/png", headers=headers)
    return Response(
        convert_image(path.read_bytes(), format, quality), media_type=MEDIA_TYPES[format], headers=headers
    )
