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

from genserve.artifacts.images import ImageStore, write_atomically
from genserve.artifacts.inputs import InputStore, MissingPicture
from genserve.artifacts.videos import VideoStore, media_type_for
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


class S3InputStore(InputStore):
    """Input pictures at s3://bucket/prefix/inputs/<hex>, beside the images; read through a local
    cache (content-addressed, so a cached copy is never stale)."""

    def __init__(self, url: str, cache_dir: Path, endpoint_url: str | None = None) -> None:
        super().__init__(cache_dir)
        import boto3

        parsed = urlparse(url)
        self.bucket = parsed.netloc
        self.prefix = "/".join(part for part in (parsed.path.strip("/"), "inputs") if part)
        self.client = boto3.client("s3", endpoint_url=endpoint_url)

    def key(self, ref: str) -> str:
        return f"{self.prefix}/{super().path(ref).name}"  # path() validates the id

    def exists(self, ref: str) -> bool:
        return super().exists(ref) or self.exists_remote(ref)

    def put(self, data: bytes) -> str:
        ref = super().put(data)  # the local copy doubles as the cache
        if not self.exists_remote(ref):
            self.client.put_object(Bucket=self.bucket, Key=self.key(ref), Body=data)
        return ref

    def exists_remote(self, ref: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(ref))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise
        return True

    def get(self, ref: str) -> bytes:
        local = super().path(ref)
        if not local.is_file():
            from botocore.exceptions import ClientError

            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self.key(ref))["Body"].read()
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    raise MissingPicture(f"picture {ref} is not in the artifact store") from None
                raise
            write_atomically(local, body)
        return super().get(ref)


class S3VideoStore(VideoStore):
    """Video files, segment frames and reports at s3://bucket/prefix/videos/<name>, read through a
    local cache: segments made on other machines reach the worker that stitches them."""

    def __init__(self, url: str, cache_dir: Path, endpoint_url: str | None = None) -> None:
        super().__init__(cache_dir)
        import boto3

        parsed = urlparse(url)
        self.bucket = parsed.netloc
        self.prefix = "/".join(part for part in (parsed.path.strip("/"), "videos") if part)
        self.client = boto3.client("s3", endpoint_url=endpoint_url)

    def save(self, name: str, data: bytes) -> Path:
        local = super().save(name, data)  # validates the name; the local copy doubles as the cache
        self.client.put_object(
            Bucket=self.bucket, Key=f"{self.prefix}/{name}", Body=data, ContentType=media_type_for(name)
        )
        return local

    def path(self, name: str) -> Path:
        local = super().path(name)
        if local.is_file():
            return local
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")["Body"].read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return local
            raise
        write_atomically(local, body)
        return local


def make_video_store(settings: Settings) -> VideoStore:
    """Where videos live: `videos_dir`, or the videos/ prefix beside the images in S3."""
    if settings.artifact_url and settings.artifact_url.startswith("s3://"):
        return S3VideoStore(settings.artifact_url, settings.videos_dir, settings.s3_endpoint_url)
    return VideoStore(settings.videos_dir)


def make_input_store(settings: Settings) -> InputStore:
    """Where input pictures live: `<data_dir>/inputs`, or the inputs/ prefix beside the images in S3."""
    if settings.artifact_url and settings.artifact_url.startswith("s3://"):
        return S3InputStore(settings.artifact_url, settings.inputs_dir, settings.s3_endpoint_url)
    return InputStore(settings.inputs_dir)


def make_image_store(settings: Settings) -> ImageStore:
    """The artifact store shared by every replica and worker: `images_dir`, or S3 for s3:// URLs."""
    if settings.artifact_url and settings.artifact_url.startswith("s3://"):
        return S3ImageStore(settings.artifact_url, settings.images_dir, settings.s3_endpoint_url)
    return ImageStore(settings.images_dir)
