"""Image files on disk: one PNG per image id, written atomically."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_IMAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")


def image_id_for(job_id: str, index: int) -> str:
    """The id of image `index` of job `job_id`; deterministic, so a retried job rewrites the same files."""
    return f"{job_id}-{index}"


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, image_id: str) -> Path:
        """Where image `image_id` lives. Ids are [A-Za-z0-9_-] only, so they cannot escape the root."""
        if not isinstance(image_id, str) or not _IMAGE_ID.fullmatch(image_id):
            raise ValueError(f"invalid image id {image_id!r}: use 1-200 characters from [A-Za-z0-9_-]")
        return self.root / f"{image_id}.png"

    def exists(self, image_id: str) -> bool:
        return self.path(image_id).is_file()

    def save(self, image_id: str, png: bytes) -> Path:
        """Write the PNG atomically (readers never see a partial file); saving again replaces it."""
        target = self.path(image_id)
        write_atomically(target, png)
        return target


def write_atomically(target: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder, then rename: never a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
