"""Multipart bodies with a byte cap: the body is refused (413) once it passes the cap, before any of
it is parsed or spooled to disk, whether or not the client sent a Content-Length."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request
from starlette.datastructures import FormData, UploadFile

# Room for the multipart boundaries, part headers and small text fields beside the pictures.
FORM_SLACK_BYTES = 64 * 1024


def too_large(field: str, message: str) -> HTTPException:
    detail = [{"loc": ["body", field], "msg": message, "type": "too_large"}]
    return HTTPException(413, detail)


async def read_form(request: Request, max_bytes: int, field: str) -> FormData:
    """The request's multipart form, read into memory up to `max_bytes` (413 naming `field` above)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        detail = [
            {
                "loc": ["body", field],
                "msg": f"send multipart/form-data with the picture in the field '{field}'",
                "type": "unsupported_media_type",
            }
        ]
        raise HTTPException(415, detail)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large(field, f"the request body is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_bytes:
            raise too_large(field, f"the request body is over the limit of {max_bytes} bytes")
    replay = Request(request.scope, receive=_replay(bytes(body)))
    try:
        return await replay.form(max_files=20, max_fields=100)
    except HTTPException:
        raise
    except Exception as error:  # a malformed body is the client's error, never a 500
        detail = [{"loc": ["body"], "msg": f"malformed multipart body: {error}", "type": "value_error"}]
        raise HTTPException(400, detail) from None


def _replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def form_file(form: FormData, field: str, max_bytes: int, required: bool = True) -> bytes | None:
    """The bytes of file field `field` (None when absent and not `required`); 422 naming it when
    it is missing or not a file, 413 when it is larger than `max_bytes`."""
    value = form.get(field)
    if value is None and not required:
        return None
    return await read_upload(value, field, max_bytes)


async def read_upload(value: object, field: str, max_bytes: int) -> bytes:
    if not isinstance(value, UploadFile):
        what = "missing" if value is None else "not a file"
        message = f"{field} is {what}: send a PNG, JPEG or WebP file"
        raise HTTPException(422, [{"loc": ["body", field], "msg": message, "type": "missing"}])
    data = await value.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise too_large(field, f"{field} is over the limit of {max_bytes} bytes (max_upload_bytes)")
    return data
