"""What the OpenAI and AUTOMATIC1111 routes share: waiting for a job, image bytes in other formats.

Both APIs answer a generation request synchronously, so their routes submit an ordinary job and
wait for it here; a client that goes away cancels its job.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Literal

import anyio
import PIL.Image
from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool

from genserve.artifacts.images import ImageStore
from genserve.store.jobs import JobRecord, JobStore

ImageFormat = Literal["png", "jpeg", "webp"]
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


async def wait_for_job(
    request: Request, store: JobStore, job_id: str, timeout: float, poll_seconds: float = 0.05
) -> JobRecord:
    """The job once it is succeeded, failed or canceled. Cancels it if the client disconnects or
    the wait passes `timeout` (then 504)."""
    deadline = time.monotonic() + timeout
    while True:
        job = await run_in_threadpool(store.get, job_id)
        if job is None or job.state.is_terminal:
            return job
        if await request.is_disconnected():
            await run_in_threadpool(store.request_cancel, job_id)
            raise HTTPException(499, "the client closed the connection; the job was canceled")
        if time.monotonic() > deadline:
            await run_in_threadpool(store.request_cancel, job_id)
            raise HTTPException(504, f"job {job_id} did not finish within {timeout:g} s; it was canceled")
        await anyio.sleep(poll_seconds)


def convert_image(
    data: bytes, image_format: ImageFormat, quality: int | None = None, size: tuple[int, int] | None = None
) -> bytes:
    """`data` (PNG or JPEG) as `image_format` (and `size`); `quality` is the JPEG/WebP quality
    (default 100). A PNG asked for as PNG comes back unchanged, with its parameters chunk.
    """
    if image_format == "png" and data.startswith(b"\x89PNG") and size is None:
        return data
    with PIL.Image.open(io.BytesIO(data)) as original:
        image = original if size is None or original.size == size else original.resize(size)
        buffer = io.BytesIO()
        if image_format == "png":
            image.save(buffer, format="PNG")
        else:
            image.convert("RGB").save(
                buffer, format=image_format.upper(), quality=100 if quality is None else quality
            )
        return buffer.getvalue()


def image_b64(
    images: ImageStore, image_id: str, image_format: ImageFormat = "png", quality: int | None = None
) -> str:
    png = images.path(image_id).read_bytes()
    return base64.b64encode(convert_image(png, image_format, quality)).decode("ascii")


def data_url_payload(data_url: str) -> str:
    """The base64 part of a `data:image/...;base64,...` URL (a preview event's image)."""
    return data_url.split(",", 1)[1] if data_url.startswith("data:") else data_url
