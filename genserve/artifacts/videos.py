"""Video files on disk: a clip, its segments' clips and frames, and a record of how it was made.

Names are `<artifact id>.<extension>`, with ids from [A-Za-z0-9_-], so a name cannot escape the
root. Files are written atomically and rewritten by a retried job under the same name.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from genserve.artifacts.images import write_atomically

_NAME = re.compile(r"[A-Za-z0-9_-]{1,200}\.(mp4|webm|gif|webp|npz|json)")

MEDIA_TYPES = {
    "mp4": "video/mp4",
    "webm": "video/webm",
    "gif": "image/gif",
    "webp": "image/webp",
    "json": "application/json",
}


class VideoStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"invalid video file name {name!r}")
        return self.root / name

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def save(self, name: str, data: bytes) -> Path:
        target = VideoStore.path(self, name)
        write_atomically(target, data)
        return target

    def read(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    # A segment's frames travel to the job that stitches them losslessly, as compressed arrays.
    def save_frames(self, name: str, frames: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, frames=frames)
        self.save(name, buffer.getvalue())

    def load_frames(self, name: str) -> np.ndarray:
        with np.load(io.BytesIO(self.read(name))) as data:
            return data["frames"]

    def save_record(self, name: str, record: dict[str, Any]) -> None:
        self.save(name, json.dumps(record, sort_keys=True).encode())

    def load_record(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.read(name))
        except (OSError, ValueError):
            return None


def media_type_for(name: str) -> str:
    return MEDIA_TYPES.get(name.rpartition(".")[2], "application/octet-stream")
