"""Images in S3 (or any S3-compatible store), for multi-node serving without a shared filesystem.

The same interface as `ImageStore`: workers `save`; the API asks for `path(image_id)`, which
downloads the object into a local cache on first use (a job's images are final once it has
succeeded, so the cache never goes stale). boto3 is imported lazily: it is needed only when
`artifact_url` is an s3:// URL.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from genserve.artifacts.images import ImageStore
from genserve.config import Settings


class S3ImageStore(ImageStore):
    """PNG objects at s3://bucket/prefix/<image_id>.png, cached under `cache_dir` for reads."""

    def __init__(self, url: str, cache_dir: Path, endpoint_url: str | None = None) -> None:
        super().__init__(cache_dir)
        import boto3

        parsed = urlparse(url)
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url)

    def key(self, image_id: str) -> str:
        name = super().path(image_id).name  # validates the id
        return f"{self.prefix}/{name}" if self.prefix else name

    def save(self, image_id: str, png: bytes) -> Path:
        """PUT is atomic in S3: readers see the old object or the new one, never a partial one."""
        self.client.put_object(Bucket=self.bucket, Key=self.key(image_id), Body=png, ContentType="image/png")
        return super().path(image_id)

    def exists(self, image_id: str) -> bool:
        return self.path(image_id).is_file()

    def path(self, image_id: str) -> Path:
        """The local cached copy, downloaded on first use; a path that does not exist when there is no object."""
        local = super().path(image_id)
        if local.is_file():
            return local
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(image_id))["Body"].read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return local
            raise
        self.root.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=self.root, prefix=f".{image_id}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as file:
            file.write(body)
        os.replace(temp_name, local)
        return local


def make_image_store(settings: Settings) -> ImageStore:
    """The artifact store shared by every replica and worker: `images_dir`, or S3 for s3:// URLs."""
    if settings.artifact_url and settings.artifact_url.startswith("s3://"):
        return S3ImageStore(settings.artifact_url, settings.images_dir, settings.s3_endpoint_url)
    return ImageStore(settings.images_dir)
