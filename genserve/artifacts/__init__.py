"""Image artifacts: PNG files with reproducibility metadata, stored by image id. No torch here."""

from genserve.artifacts.images import ImageStore, image_id_for
from genserve.artifacts.png import a1111_parameters, encode_png, read_png_metadata

__all__ = ["ImageStore", "a1111_parameters", "encode_png", "image_id_for", "read_png_metadata"]
