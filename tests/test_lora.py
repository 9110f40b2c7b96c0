"""LoRA per request (issue 18): the registry, formats, batch_key, the engine's adapters, the API.

Tiny LoRAs are written in code for the tiny random-weight models (research/conditioning.md §4.3):
diffusers format through peft's `add_adapter` + `save_lora_weights`, kohya format by hand
(`lora_unet_*` / `lora_te_*` down, up and alpha), plus LoHa and SDXL files that must be refused.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

from genserve.engine.engine import Engine, EngineError
from genserve.engine.models.loras import read_lora_info, scan_loras
from genserve.engine.models.registry import scan_models
from genserve.engine.models.samplers import build_scheduler
from genserve.schemas.generation import GenerationParams, batch_key
from genserve.schemas.lora import LoraRef, LoraTagError, extract_lora_tags, lora_key, merge_loras

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
BUILTIN = (
    Path(__file__).resolve().parents[1]
    / "genserve"
    / "builtin_models"
    / "lora"
    / "shapes-white-frame.safetensors"
)
needs_builtin = pytest.mark.skipif(
    not BUILTIN.exists(), reason="the built-in LoRA is trained by genserve.toymodel.train_lora"
)


# 0. Tiny LoRA files


def write_diffusers_lora(
    pipe_dir: Path, path: Path, seed: int, rank: int = 4, alpha: int | None = None
) -> Path:
    """A LoRA (rank 4, alpha = rank) on every UNet attention projection, random A and B (diffusers/peft
    names)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(UNet2DConditionModel.from_pretrained(pipe_dir / "unet"))
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, target_modules=list(ATTENTION), init_lora_weights=False
    )
    unet.add_adapter(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=get_peft_model_state_dict(unet),
        weight_name=path.name,
        safe_serialization=True,
    )
    return path


def write_kohya_lora(pipe_dir: Path, path: Path, seed: int, rank: int = 4) -> Path:
    """A1111/kohya names: `lora_unet_<module path with _>.lora_down/.lora_up/.alpha` on the UNet's
    attention projections and `lora_te_…` on the text encoder's first layer."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def add(prefix: str, module: torch.nn.Linear) -> None:
        tensors[f"{prefix}.lora_down.weight"] = (
            torch.randn(rank, module.in_features, generator=generator) * 0.3
        )
        tensors[f"{prefix}.lora_up.weight"] = (
            torch.randn(module.out_features, rank, generator=generator) * 0.3
        )
        tensors[f"{prefix}.alpha"] = torch.tensor(float(rank))

    unet = UNet2DConditionModel.from_pretrained(pipe_dir / "unet")
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(
            tuple(f"attn{i}.{p}" for i in (1, 2) for p in ATTENTION)
        ):
            add("lora_unet_" + name.replace(".", "_"), module)
    text_encoder = CLIPTextModel.from_pretrained(pipe_dir / "text_encoder")
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        encoder = getattr(text_encoder, "text_model", text_encoder).encoder  # transformers 5 drops text_model
        module = encoder.layers[0].self_attn.get_submodule(proj)
        add(f"lora_te_text_model_encoder_layers_0_self_attn_{proj}", module)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)
    return path


def write_loha(path: Path) -> Path:
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{prefix}.hada_w1_a": torch.zeros(4, 2), f"{prefix}.hada_w1_b": torch.zeros(2, 4),
               f"{prefix}.alpha": torch.tensor(2.0)}, path)  # fmt: skip
    return path


def write_sdxl_lora(path: Path) -> Path:
    """An SDXL file by its names (second text encoder, SGM UNet blocks, cross-attention width 2048)."""
    prefix = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    save_file({f"{prefix}.lora_down.weight": torch.zeros(4, 2048), f"{prefix}.lora_up.weight": torch.zeros(640, 4),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280)}, path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def models(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models, and a lora/ folder with diffusers, kohya, LoHa and SDXL LoRAs."""
    root = tmp_path_factory.mktemp("lora-models")
    for entry in tiny_models_dir.iterdir():
        (root / entry.name).symlink_to(entry)
    sd15 = tiny_models_dir / "tiny-sd15"
    write_diffusers_lora(sd15, root / "lora" / "style-a.safetensors", seed=1)
    write_diffusers_lora(sd15, root / "lora" / "style-b.safetensors", seed=2)
    write_kohya_lora(sd15, root / "lora" / "kohya-c.safetensors", seed=3)
    write_loha(root / "lora" / "loha-d.safetensors")
    write_sdxl_lora(root / "lora" / "xl-e.safetensors")
    return root


@pytest.fixture(scope="module")
def engine(models: Path) -> Engine:
    return Engine(scan_models(models), device="cpu", dtype="float32", loras=scan_loras(models))


def params(loras: list[dict] | None = None, **kwargs: object) -> GenerationParams:
    base = dict(prompt="a red circle", model="tiny-sd15", seed=3, steps=6, width=64, height=64, cfg_scale=5.0)
    return GenerationParams(**{**base, **kwargs, "loras": loras})


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


# 1. Registry and prompt tags


def test_the_registry_reads_format_and_family_from_tensor_names(models: Path) -> None:
    loras = scan_loras(models)
    assert {name: (i.format, i.family) for name, i in loras.items()} == {
        "style-a": ("diffusers", "sd15"),
        "style-b": ("diffusers", "sd15"),
        "kohya-c": ("kohya", "sd15"),
        "loha-d": ("loha", "sd15"),
        "xl-e": ("kohya", "sdxl"),
    }
    assert not loras["loha-d"].supported and "LoHa" in (loras["loha-d"].unsupported_reason() or "")
    assert "lora" not in scan_models(models)  # the folder is not a model


@needs_builtin
def test_the_builtin_companion_is_registered_with_its_card() -> None:
    builtin = scan_loras(Path("/nonexistent"), builtin=True)
    info = builtin["shapes-white-frame"]
    assert (info.family, info.format, info.base_model) == ("sd15", "diffusers", "genserve-shapes")
    assert info.description and info.size_bytes < 10 * 2**20


@pytest.mark.parametrize(
    ("prompt", "stripped", "refs"),
    [
        ("a cat <lora:foo:0.5>", "a cat", [("foo", 0.5)]),
        ("<lora:foo> a cat, <LORA:bar:-1>", "a cat,", [("foo", 1.0), ("bar", -1.0)]),
        ("a (cat:1.2) <lora:my style v2:.8>", "a (cat:1.2)", [("my style v2", 0.8)]),
        ("no tags <hypernet:x:1>", "no tags <hypernet:x:1>", []),
    ],
)
def test_lora_tags_leave_the_prompt(prompt: str, stripped: str, refs: list) -> None:
    text, found = extract_lora_tags(prompt)
    assert text == stripped and [(r.name, r.weight) for r in found] == refs


@pytest.mark.parametrize(
    "tag", ["<lora:../etc/passwd:1>", "<lora:a:x>", "<lora:a:1:2>", "<lora:a:te=1>", "<lora:a:99>"]
)
def test_bad_lora_tags_are_refused(tag: str) -> None:
    with pytest.raises(LoraTagError):
        extract_lora_tags(f"a cat {tag}")


def test_tags_merge_into_loras_and_an_explicit_weight_wins() -> None:
    p = GenerationParams(prompt="a cat <lora:a:0.5> <lora:b:0.7>", loras=[LoraRef(name="a", weight=0.9)])
    assert p.prompt == "a cat"
    assert [(r.name, r.weight) for r in p.loras or []] == [("a", 0.9), ("b", 0.7)]
    assert GenerationParams.model_validate(p.model_dump()) == p  # stored and read back: the same
    assert merge_loras(None, []) is None
    with pytest.raises(ValueError, match="named once"):
        GenerationParams(prompt="x", loras=[LoraRef(name="a"), LoraRef(name="a", weight=0.5)])


def test_the_lora_set_is_in_batch_key() -> None:
    plain = params()
    a = params([{"name": "style-a", "weight": 0.8}])
    assert batch_key(plain) != batch_key(a)
    assert batch_key(a) != batch_key(params([{"name": "style-a", "weight": 0.5}]))
    ab = params([{"name": "style-a"}, {"name": "style-b", "weight": 0.5}])
    ba = params([{"name": "style-b", "weight": 0.5}, {"name": "style-a"}])
    assert batch_key(ab) == batch_key(ba)  # the set, not the order
    assert batch_key(params([{"name": "style-a", "weight": 0}])) == batch_key(plain)  # weight 0 is off
    assert lora_key(ab.loras) == (("style-a", 1.0), ("style-b", 0.5))


# 2. The engine


def diffusers_image(models: Path, lora: str | None, weight: float = 1.0) -> PIL.Image.Image:
    """The same request through a plain diffusers pipeline with the LoRA loaded by hand."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        models / "tiny-sd15", safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.scheduler = build_scheduler("sd15", "euler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(models / "lora", weight_name=f"{lora}.safetensors", adapter_name="x")
        pipe.set_adapters(["x"], adapter_weights=[weight])
    return pipe(
        "a red circle",
        num_inference_steps=6,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]


@pytest.mark.parametrize(("lora", "weight"), [("style-a", 1.0), ("kohya-c", 0.7)])
def test_a_request_with_a_lora_differs_and_equals_a_manual_diffusers_load(
    engine: Engine, models: Path, lora: str, weight: float
) -> None:
    [plain] = engine.generate(params())
    [ours] = engine.generate(params([{"name": lora, "weight": weight}]))
    assert np.abs(pixels(ours) - pixels(plain)).max() > 8
    assert np.abs(pixels(ours) - pixels(diffusers_image(models, lora, weight))).max() <= 1
    [again] = engine.generate(params())  # the adapters are off again for a request without LoRAs
    assert np.array_equal(pixels(again), pixels(plain))


def test_the_kohya_text_encoder_part_is_loaded(engine: Engine) -> None:
    pipe = engine.pipeline("tiny-sd15")
    engine.generate(params([{"name": "kohya-c"}]))
    assert any("lora" in name for name, _ in pipe.text_encoder.named_modules())


def test_two_jobs_with_different_lora_sets_are_each_correct(engine: Engine, models: Path) -> None:
    """Batches of different sets run one after the other on one pipeline: each as if alone."""
    [a1] = engine.generate(params([{"name": "style-a"}]))
    [b] = engine.generate(params([{"name": "style-b", "weight": 0.6}]))
    [ab] = engine.generate(params([{"name": "style-a"}, {"name": "style-b", "weight": 0.6}]))
    [a2] = engine.generate(params([{"name": "style-a"}]))
    assert np.array_equal(pixels(a1), pixels(a2))
    assert np.abs(pixels(a1) - pixels(b)).max() > 8
    assert np.abs(pixels(ab) - pixels(a1)).max() > 8 and np.abs(pixels(ab) - pixels(b)).max() > 8
    assert np.abs(pixels(b) - pixels(diffusers_image(models, "style-b", 0.6))).max() <= 1


def test_loaded_adapters_are_evicted_least_recently_used_first(models: Path) -> None:
    engine = Engine(
        scan_models(models), device="cpu", dtype="float32", loras=scan_loras(models), lora_cache_size=1
    )
    [a1] = engine.generate(params([{"name": "style-a"}]))
    engine.generate(params([{"name": "style-b"}]))
    adapters = engine._adapters["tiny-sd15"]
    assert [name.rsplit("_", 1)[0] for name in adapters.loaded()] == ["style_b"]
    [a2] = engine.generate(params([{"name": "style-a"}]))  # loaded again
    assert np.array_equal(pixels(a1), pixels(a2))


def test_a_batch_of_one_lora_set_matches_each_request_alone(engine: Engine) -> None:
    from genserve.engine.loop.denoise import BatchItem

    loras = [{"name": "style-a", "weight": 0.8}]
    items = [BatchItem(params(loras, seed=5)), BatchItem(params(loras, prompt="a blue square", seed=9))]
    outcomes = engine.generate_batch(items)
    for item, outcome in zip(items, outcomes, strict=True):
        [alone] = engine.generate(item.params)
        assert np.abs(pixels(outcome.images[0]) - pixels(alone)).max() <= 1


@pytest.mark.parametrize(
    ("lora", "message"),
    [("loha-d", "LyCORIS LoHa"), ("xl-e", "for sdxl models, not sd15"), ("missing", "unknown LoRA")],
)
def test_the_engine_refuses_loras_it_cannot_apply(engine: Engine, lora: str, message: str) -> None:
    with pytest.raises(EngineError, match=rf"loras\[0\]\.name: .*{message}"):
        engine.generate(params([{"name": lora}]))


@needs_builtin
def test_a_lora_for_another_cross_attention_width_is_refused(models: Path) -> None:
    info = read_lora_info(BUILTIN)
    engine = Engine(scan_models(models), device="cpu", dtype="float32", loras={"shapes-white-frame": info})
    with pytest.raises(EngineError, match="cross-attention width 128"):
        engine.generate(params([{"name": "shapes-white-frame"}]))
