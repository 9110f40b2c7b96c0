"""PNG metadata (A1111 infotext + genserve JSON) and the on-disk image store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from genserve.artifacts import ImageStore, a1111_parameters, encode_png, image_id_for, read_png_metadata
from genserve.artifacts.png import A1111_SAMPLER_NAMES
from genserve.schemas.generation import SAMPLER_NAMES, GenerationParams


def make_params(**overrides: object) -> GenerationParams:
    values: dict = dict(
        prompt="a red circle on a blue background",
        negative_prompt="blurry",
        model="tiny-sd15",
        seed=123,
        steps=20,
        cfg_scale=7.0,
        width=512,
        height=768,
        sampler="euler_a",
        num_images=2,
    )
    return GenerationParams(**{**values, **overrides})


def test_a1111_infotext() -> None:
    text = a1111_parameters(make_params(), seed=124, model_name="tiny-sd15")
    assert text == (
        "a red circle on a blue background\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.0, Seed: 124, Size: 512x768, Model: tiny-sd15"
    )


def test_a1111_infotext_leaves_out_an_empty_negative_prompt() -> None:
    text = a1111_parameters(
        make_params(negative_prompt="", sampler="dpmpp_2m_karras"), seed=1, model_name="m"
    )
    assert text.splitlines() == [
        "a red circle on a blue background",
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.0, Seed: 1, Size: 512x768, Model: m",
    ]


def test_every_sampler_has_an_a1111_name() -> None:
    assert set(A1111_SAMPLER_NAMES) == set(SAMPLER_NAMES)


@pytest.mark.parametrize("prompt", ["a red circle", "赤い丸, ünïcode"])
def test_png_round_trip_carries_both_chunks(prompt: str) -> None:
    params = make_params(prompt=prompt)
    image = PIL.Image.fromarray(np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3))

    data = encode_png(image, params, seed=124, index=1, extra={"job_id": "job_1"})
    metadata = read_png_metadata(data)

    assert metadata["parameters"] == a1111_parameters(params, seed=124, model_name="tiny-sd15")
    assert metadata["parameters"].startswith(prompt + "\n")
    record = json.loads(metadata["genserve"])
    assert record == {"params": params.model_dump(mode="json"), "seed": 124, "index": 1, "job_id": "job_1"}
    assert GenerationParams(**record["params"]) == params
    # The pixels are stored losslessly.
    decoded = PIL.Image.open(io.BytesIO(data))
    assert decoded.format == "PNG"
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_read_png_metadata_rejects_other_formats() -> None:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    with pytest.raises(ValueError, match="not a PNG"):
        read_png_metadata(buffer.getvalue())


def test_image_ids_are_deterministic() -> None:
    assert image_id_for("01HXYZ", 0) == "01HXYZ-0"
    assert image_id_for("01HXYZ", 3) == image_id_for("01HXYZ", 3)


def test_image_store_saves_atomically_and_idempotently(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    image_id = image_id_for("job_1", 0)
    assert not store.exists(image_id)

    path = store.save(image_id, b"first")
    assert path == store.path(image_id) == tmp_path / "images" / "job_1-0.png"
    assert store.exists(image_id)
    assert store.save(image_id, b"second") == path  # a retried job rewrites the same file
    assert path.read_bytes() == b"second"
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["job_1-0.png"]  # no temp files left


@pytest.mark.parametrize(
    "image_id", ["../secret", "a/b", "..", "", "x.png", "/etc/passwd", "a\\b", "a\x00b", "é", "a" * 201]
)
def test_image_store_rejects_ids_that_could_escape_its_root(tmp_path: Path, image_id: str) -> None:
    store = ImageStore(tmp_path)
    with pytest.raises(ValueError, match="invalid image id"):
        store.path(image_id)
    with pytest.raises(ValueError):
        store.exists(image_id)
    with pytest.raises(ValueError):
        store.save(image_id, b"x")
    assert list(tmp_path.iterdir()) == []
