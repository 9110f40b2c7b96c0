"""Input pictures (init images, masks): stored once, content-addressed by sha256.

A job's params name a picture as `sha256:<64 hex>` (schemas/image_inputs.py), never by its bytes,
so a queued job survives a restart and database rows stay small. The bytes are kept exactly as the
client sent them (PNG, JPEG or WebP): the id of an upload is the hash of what was uploaded, and the
same picture sent as base64 gets the same id.

The API checks every picture before it stores it (`inspect_picture`); the worker reads it back by
hash and decodes it the same way (`open_picture`), so both see the same size.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import PIL.ImageOps

from genserve.artifacts.images import write_atomically
from genserve.schemas.image_inputs import is_image_hash

# The GenerationParams fields that name input pictures (and BatchItem's fields for them, decoded).
PICTURE_FIELDS = ("init_image", "mask")
# PIL format name -> the name the API reports. Nothing else is opened (PIL has many more decoders).
INPUT_FORMATS: dict[str, str] = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
_OTHER_FORMATS = {  # magic numbers of formats people try, for a clearer refusal
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"\x00\x00\x00\x0cjP": "JPEG 2000",
    b"%PDF": "PDF",
    b"<svg": "SVG",
    b"<?xml": "SVG/XML",
}


class PictureError(ValueError):
    """A picture that cannot be used: not an accepted format, corrupt, or over a limit."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.too_large = too_large  # over a byte limit: 413 for an upload body


class MissingPicture(LookupError):
    """No stored picture has this id."""


@dataclass(frozen=True)
class PictureInfo:
    """A checked picture: its id and what the upload answer reports."""

    id: str  # sha256:<hex>
    width: int  # after the EXIF orientation is applied, as the engine will see it
    height: int
    format: str  # png | jpeg | webp
    bytes: int


def picture_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def media_type_of(data: bytes) -> str:
    """image/png, image/jpeg or image/webp, from the magic number."""
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def open_picture(data: bytes) -> PIL.Image.Image:
    """Decode fully, upright (EXIF orientation applied). Raises PictureError for anything else
    than an intact PNG, JPEG or WebP."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data), formats=list(INPUT_FORMATS))
            image.load()  # a truncated or corrupt file fails here, not in the worker
            fmt = image.format
            upright = PIL.ImageOps.exif_transpose(image)
    except PIL.UnidentifiedImageError:
        raise PictureError(_unknown_format(data)) from None
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning):
        raise PictureError("the picture has too many pixels to decode safely") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise PictureError(f"the picture is corrupt or truncated ({error})") from None
    upright.format = fmt
    return upright


def repaint_coverage(mask: PIL.Image.Image) -> tuple[bool, bool]:
    """(whether any pixel, whether every pixel) of `mask` means repaint, by AUTOMATIC1111's rule that
    the engine applies too (engine/stages/masks.py `read_mask`): where the mask has transparency, its
    opaque pixels (alpha > 128); otherwise its white ones (L > 128)."""
    channel = mask.convert("L")
    if mask.mode in ("RGBA", "LA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            channel = alpha
    low, high = channel.getextrema()
    return high > 128, low > 128


def inspect_picture(data: bytes, max_bytes: int, max_pixels: int) -> PictureInfo:
    """Check `data` against the limits and decode it once; raises PictureError saying why not."""
    if len(data) > max_bytes:
        raise PictureError(
            f"the picture is {len(data)} bytes; the limit is {max_bytes} (max_upload_bytes)", too_large=True
        )
    if not data:
        raise PictureError("the picture is empty")
    _check_pixels(data, max_pixels)  # from the header, before a full decode
    image = open_picture(data)
    return PictureInfo(picture_id(data), image.width, image.height, INPUT_FORMATS[image.format], len(data))


def _check_pixels(data: bytes, max_pixels: int) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(io.BytesIO(data), formats=list(INPUT_FORMATS)) as image:
                width, height = image.size
    except PIL.UnidentifiedImageError:
        raise PictureError(_unknown_format(data)) from None
    except PIL.Image.DecompressionBombError:
        raise PictureError("the picture has too many pixels to decode safely") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise PictureError(f"the picture is corrupt or truncated ({error})") from None
    if width * height > max_pixels:
        raise PictureError(
            f"the picture is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
            "(max_input_pixels)"
        )


def _unknown_format(data: bytes) -> str:
    if media_type_of(data) != "application/octet-stream":
        return "the picture is corrupt or truncated (its header cannot be read)"
    head = data[:16].lstrip()
    for magic, name in _OTHER_FORMATS.items():
        if head.startswith(magic):
            return f"{name} pictures are not accepted; send PNG, JPEG or WebP"
    return "not a PNG, JPEG or WebP picture"


class InputStore:
    """Pictures in a directory: <root>/<first two hex digits>/<hex>, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._sizes: dict[str, tuple[int, int]] = {}  # content-addressed: an entry never goes stale

    def path(self, ref: str) -> Path:
        if not isinstance(ref, str) or not is_image_hash(ref):
            raise ValueError(f"invalid picture id {ref!r}: expected sha256:<64 hex digits>")
        digest = ref.removeprefix("sha256:")
        return self.root / digest[:2] / digest

    def exists(self, ref: str) -> bool:
        return self.path(ref).is_file()

    def put(self, data: bytes) -> str:
        """Store `data` under its hash (once) and return the id."""
        ref = picture_id(data)
        target = self.path(ref)
        if not target.is_file():
            write_atomically(target, data)
        return ref

    def get(self, ref: str) -> bytes:
        """The stored bytes; MissingPicture when absent or when they no longer match their hash."""
        try:
            data = self.path(ref).read_bytes()
        except FileNotFoundError:
            raise MissingPicture(f"picture {ref} is not in the artifact store") from None
        if picture_id(data) != ref:
            raise MissingPicture(f"picture {ref} in the artifact store is damaged (its hash differs)")
        return data

    def size(self, ref: str) -> tuple[int, int]:
        """(width, height) upright, as the engine will see the picture."""
        if ref not in self._sizes:
            image = open_picture(self.get(ref))
            if len(self._sizes) >= 10_000:
                self._sizes.clear()
            self._sizes[ref] = image.size
        return self._sizes[ref]
