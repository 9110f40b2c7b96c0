"""Uploads: store an input picture once and name it by its content hash in later requests."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from genserve.api.deps import ServicesDep
from genserve.api.forms import FORM_SLACK_BYTES, form_file, read_form, too_large
from genserve.artifacts.inputs import (
    INPUT_FORMATS,
    MissingPicture,
    PictureError,
    inspect_picture,
    media_type_of,
)
from genserve.schemas import LimitError

router = APIRouter(tags=["uploads"])

_MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}
PictureId = Annotated[str, Path(pattern=r"^sha256:[0-9a-f]{64}$", description="sha256:<64 hex digits>")]


class UploadPublic(BaseModel):
    id: str = Field(description="sha256:<hex> of the bytes: use it as init_image or mask.")
    width: int
    height: int
    format: str = Field(description="png, jpeg or webp")
    bytes: int


@router.post(
    "/v1/uploads",
    status_code=201,
    response_model=UploadPublic,
    operation_id="upload_picture",
    openapi_extra=_MULTIPART_BODY,
    responses={413: {"description": "The picture is larger than max_upload_bytes"}},
)
async def upload_picture(request: Request, services: ServicesDep) -> UploadPublic:
    """Store a picture (multipart field `file`; PNG, JPEG or WebP). Its id is its sha256, so the
    same picture uploaded twice gets the same id."""
    limits = services.settings.limits
    form = await read_form(request, limits.max_upload_bytes + FORM_SLACK_BYTES, "file")
    data = await form_file(form, "file", limits.max_upload_bytes)
    assert data is not None  # required
    try:
        info = inspect_picture(data, limits.max_upload_bytes, limits.max_input_pixels)
    except PictureError as error:
        if error.too_large:
            raise too_large("file", error.message) from None
        raise LimitError("file", f"file: {error.message}") from None
    await run_in_threadpool(services.inputs.put, data)
    return UploadPublic(
        id=info.id, width=info.width, height=info.height, format=info.format, bytes=info.bytes
    )


@router.get(
    "/v1/uploads/{picture_id}",
    operation_id="get_upload",
    response_class=Response,
    responses={200: {"content": {f"image/{name}": {} for name in INPUT_FORMATS.values()}}},
)
def get_upload(picture_id: PictureId, services: ServicesDep) -> Response:
    """The picture's bytes, exactly as uploaded (or sent as base64 with a job)."""
    try:
        data = services.inputs.get(picture_id)
    except MissingPicture:
        raise HTTPException(404, f"picture {picture_id} not found") from None
    headers = {"Cache-Control": "private, max-age=31536000, immutable"}  # content-addressed
    return Response(data, media_type=media_type_of(data), headers=headers)
