"""Generated images, served from the image store."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from genserve.api.deps import ServicesDep

router = APIRouter(tags=["images"])


@router.get(
    "/v1/images/{image_id}",
    operation_id="get_image",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}, "description": "The PNG, with its generation parameters"}},
)
def get_image(image_id: str, services: ServicesDep) -> FileResponse:
    try:
        path = services.images.path(image_id)
    except ValueError:
        raise HTTPException(404, f"image {image_id} not found") from None
    if not path.is_file():
        raise HTTPException(404, f"image {image_id} not found")
    return FileResponse(
        path, media_type="image/png", headers={"Cache-Control": "public, max-age=31536000, immutable"}
    )
