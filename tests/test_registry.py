"""The model registry: family, native size, format and dtype, read from headers without torch."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from genserve.engine.models.registry import (
    SUPPORTED_SAMPLERS,
    UnknownModelFormat,
    detect_family,
    sampler_supported,
    scan_models,
)
from genserve.schemas.generation import SAMPLER_NAMES

# Tensor names of the original single-file layouts, one or two per family.
SD1_KEYS = [
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    "model.diffusion_model.input_blocks.0.0.weight",
]
SD2_KEYS = ["cond_stage_model.model.token_embedding.weight", "model.diffusion_model.input_blocks.0.0.weight"]
SDXL_KEYS = [
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
    "conditioner.embedders.1.model.ln_final.weight",
    "model.diffusion_model.input_blocks.0.0.weight",
]
SDXL_UNET_ONLY_KEYS = [
    "model.diffusion_model.label_emb.0.0.weight",
    "model.diffusion_model.input_blocks.0.0.weight",
]
SD3_KEYS = [
    "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
    "first_stage_model.decoder.conv_in.weight",
]


def write_checkpoint(path: Path, keys: list[str], dtype: torch.dtype = torch.float16) -> Path:
    save_file({key: torch.zeros(4, 2, dtype=dtype) for key in keys}, path)
    return path


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_tiny_fixtures_are_registered_as_diffusers_models(tiny_models_dir: Path, family: str) -> None:
    info = scan_models(tiny_models_dir)[f"tiny-{family}"]

    assert info.family == family
    assert info.format == "diffusers"
    assert info.path == tiny_models_dir / f"tiny-{family}"
    # latent sample_size 32 x VAE scale factor 2
    assert (info.native_width, info.native_height) == (64, 64)
    assert info.dtype == "float32"
    assert detect_family(info.path) == family


@pytest.mark.parametrize(
    ("keys", "family", "size"),
    [
        (SD1_KEYS, "sd15", 512),
        (SD2_KEYS, "sd15", 768),
        (SDXL_KEYS, "sdxl", 1024),
        (SDXL_UNET_ONLY_KEYS, "sdxl", 1024),
        (SD3_KEYS, "sd3", 1024),
    ],
)
def test_single_file_family_comes_from_tensor_names(
    tmp_path: Path, keys: list[str], family: str, size: int
) -> None:
    path = write_checkpoint(tmp_path / "my-model.safetensors", keys)

    assert detect_family(path) == family
    info = scan_models(tmp_path)["my-model"]
    assert (info.family, info.format, info.path) == (family, "single_file", path)
    assert (info.native_width, info.native_height) == (size, size)
    assert info.dtype == "float16"


def test_single_file_dtype_is_the_one_holding_most_weights(tmp_path: Path) -> None:
    # Checkpoints often keep a few small tensors in float32 next to float16 weights.
    path = tmp_path / "mixed.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(64, 64, dtype=torch.bfloat16),
            "model.diffusion_model.input_blocks.0.0.bias": torch.zeros(64, dtype=torch.float32),
        },
        path,
    )
    assert scan_models(tmp_path)["mixed"].dtype == "bfloat16"


def test_scan_skips_entries_that_are_not_models(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_checkpoint(tmp_path / "good.safetensors", SD1_KEYS)
    (tmp_path / "no-index").mkdir()
    (tmp_path / "other-pipeline").mkdir()
    (tmp_path / "other-pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (tmp_path / "broken-index").mkdir()
    (tmp_path / "broken-index" / "model_index.json").write_text("{not json")
    write_checkpoint(tmp_path / "lora.safetensors", ["lora_unet_down_blocks_0.alpha"])
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "old.ckpt").write_bytes(b"pickle")
    (tmp_path / ".hidden").mkdir()

    with caplog.at_level(logging.WARNING, logger="genserve.engine.models.registry"):
        models = scan_models(tmp_path)

    assert list(models) == ["good"]
    skipped = caplog.text
    for name in ("no-index", "other-pipeline", "broken-index", "lora", "garbage", "empty", "old.ckpt"):
        assert name in skipped
    assert "FluxPipeline" in skipped
    assert ".hidden" not in skipped


def test_scan_of_missing_directory_is_empty(tmp_path: Path) -> None:
    assert scan_models(tmp_path / "nope") == {}


def test_name_clash_keeps_the_first_entry(tmp_path: Path, tiny_models_dir: Path) -> None:
    shutil.copytree(tiny_models_dir / "tiny-sd15", tmp_path / "clash")
    write_checkpoint(tmp_path / "clash.safetensors", SDXL_KEYS)

    models = scan_models(tmp_path)

    assert models["clash"].format == "diffusers"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p.mkdir(), "no model_index.json"),
        (
            lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not valid json}"),
            "unreadable safetensors header",
        ),
        (lambda p: write_checkpoint(p, ["text_projection.weight"]), "match no supported family"),
    ],
)
def test_detect_family_explains_unknown_formats(tmp_path: Path, setup, message: str) -> None:
    path = tmp_path / "thing.safetensors"
    setup(path)
    with pytest.raises(UnknownModelFormat, match=message):
        detect_family(path)


def test_detect_family_rejects_other_file_types(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"x")
    with pytest.raises(UnknownModelFormat, match="not a model"):
        detect_family(path)


def test_sampler_table() -> None:
    for family in ("sd15", "sdxl"):
        assert all(sampler_supported(family, name) for name in SAMPLER_NAMES)
    assert sampler_supported("sd3", "euler")
    assert sampler_supported("sd3", "dpmpp_2m")
    assert sampler_supported("sd3", "unipc")
    for name in ("euler_a", "ddim", "dpmpp_2m_karras"):
        assert not sampler_supported("sd3", name)
    assert not sampler_supported("sd15", "heun")
    assert not sampler_supported("flux", "euler")  # type: ignore[arg-type]
    assert all(set(names) <= set(SAMPLER_NAMES) for names in SUPPORTED_SAMPLERS.values())


def test_registry_and_artifacts_do_not_import_torch() -> None:
    # The API server imports these; it must stay free of the ML stack.
    code = (
        "import sys, genserve.engine.models.registry, genserve.engine.errors, genserve.artifacts; "
        "heavy = {'torch', 'diffusers', 'transformers'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_card_defaults_fill_what_a_request_leaves_out(tmp_path: Path, tiny_models_dir: Path) -> None:
    """A model switch changes no one's settings: each model's card gives its own CFG, steps and sampler
    to requests that name none, /v1/models shows them (the web UI reads them there), and what a
    request names wins."""
    import shutil

    from fastapi.testclient import TestClient

    from genserve.api.app import create_app
    from genserve.config import Settings

    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir / "tiny-sd15", models / "carded")
    (models / "carded" / "README.md").write_text(
        "---\ngenserve:\n  default_cfg_scale: 3.5\n  default_steps: 7\n  default_sampler: ddim\n---\n# carded\n"
    )
    shutil.copytree(tiny_models_dir / "tiny-sd15", models / "plain")
    settings = Settings(data_dir=tmp_path / "data", models_dir=models, workers=0, builtin_models=False)
    with TestClient(create_app(settings, supervise_workers=False)) as client:
        listed = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
        assert (listed["carded"]["default_cfg_scale"], listed["carded"]["default_steps"]) == (3.5, 7)
        assert listed["carded"]["default_sampler"] == "ddim"
        assert (listed["plain"]["default_steps"], listed["plain"]["default_sampler"]) == (20, "euler")

        def params(**body: object) -> dict:
            response = client.post("/v1/jobs", json={"prompt": "a", "width": 64, "height": 64, **body})
            assert response.status_code == 202, response.text
            return response.json()["params"]

        carded = params(model="carded")
        assert (carded["cfg_scale"], carded["steps"], carded["sampler"]) == (3.5, 7, "ddim")
        plain = params(model="plain")
        assert (plain["cfg_scale"], plain["steps"], plain["sampler"]) == (7.0, 20, "euler")
        named = params(model="carded", steps=3, sampler="euler_a", cfg_scale=5.0)
        assert (named["cfg_scale"], named["steps"], named["sampler"]) == (5.0, 3, "euler_a")


def test_models_list_says_which_are_refiners_and_inpainting_checkpoints(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from genserve.api.app import create_app
    from genserve.config import Settings
    from genserve.engine.models.fixtures import write_tiny_pipeline, write_tiny_refiner

    models = tmp_path / "models"
    write_tiny_pipeline("sd15", models / "inpaint", inpainting=True)
    write_tiny_refiner(models / "refiner")
    write_tiny_pipeline("sd15", models / "plain")
    settings = Settings(data_dir=tmp_path / "data", models_dir=models, workers=0, builtin_models=False)
    with TestClient(create_app(settings, supervise_workers=False)) as client:
        listed = {m["name"]: (m["inpainting"], m["refiner"]) for m in client.get("/v1/models").json()["data"]}
        assert listed == {"inpaint": (True, False), "refiner": (False, True), "plain": (False, False)}
        estimate = client.post("/v1/estimate", json={"model": "plain", "width": 64, "height": 64})
        assert estimate.status_code == 200 and estimate.json()["steps"] == 20, estimate.text


def test_estimate_counts_the_hires_pass_like_the_submitted_job(tmp_path: Path, tiny_models_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from genserve.api.app import create_app
    from genserve.config import Settings

    settings = Settings(
        data_dir=tmp_path / "data", models_dir=tiny_models_dir, workers=0, builtin_models=False
    )
    with TestClient(create_app(settings, supervise_workers=False)) as client:
        body = {"model": "tiny-sd15", "width": 64, "height": 64, "steps": 10}
        plain = client.post("/v1/estimate", json=body).json()
        hires = client.post("/v1/estimate", json={**body, "hires": {"scale": 2, "steps": 5}}).json()
        # Five more steps at 128x128 per batch, as the job's own estimate counts them.
        assert hires["seconds_per_batch"] > plain["seconds_per_batch"] + 5 * plain["step_s"] * 0.99
        job = client.post("/v1/jobs", json={"prompt": "a", **body, "hires": {"scale": 2, "steps": 5}}).json()
        assert abs(job["estimated_seconds"] - hires["seconds_per_batch"]) < 1e-6
