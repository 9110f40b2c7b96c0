"""The workflow runner's pure parts: graph validation, sampler and denoise mapping, the plan of
genserve jobs a graph becomes, and the cache keys that decide what a re-run recomputes."""

from __future__ import annotations

import copy

import pytest

from genserve.engine.stages.plan import second_pass_schedule
from genserve.scheduler.cost import steps_run
from genserve.workflows.graph import WorkflowError, parse_graph
from genserve.workflows.plan import STAGE_REF, plan_graph
from genserve.workflows.samplers import (
    SamplerMappingError,
    advanced_to_strength,
    denoise_to_strength,
    genserve_sampler,
)
from tests.workflow_graphs import img2img, txt2img, txt2video, with_hires, with_scale

PICTURE = "sha256:" + "1" * 64


class FakeResources:
    def models(self) -> set[str]:
        return {"genserve-shapes", "genserve-shapes-motion", "wan-tiny"}

    def loras(self) -> set[str]:
        return {"shapes-white-frame"}

    def controlnets(self) -> set[str]:
        return {"genserve-shapes-canny"}

    def upscalers(self) -> dict[str, float]:
        return {"genserve-shapes-2x": 2.0}

    def picture(self, name: str) -> tuple[str, tuple[int, int]] | None:
        return {"red.png": (PICTURE, (64, 48)), "blue.png": ("sha256:" + "3" * 64, (64, 48))}.get(name)

    def mask(self, ref: str) -> str | None:
        return "sha256:" + "2" * 64

    def video_models(self) -> dict[str, str | None]:
        return {"genserve-shapes-motion": "dpmpp_2m", "wan-tiny": None}


def plan(graph: dict):
    return plan_graph(parse_graph(graph), FakeResources())


def errors_of(graph: dict) -> list[tuple[str, str, str | None]]:
    with pytest.raises(WorkflowError) as caught:
        plan(graph)
    return [(e.node_id, e.class_type, e.input) for e in caught.value.errors]


# -- samplers and denoise -------------------------------------------------------------------------


def test_comfy_samplers_map_onto_the_same_solvers() -> None:
    assert genserve_sampler("euler", "normal") == "euler"
    assert genserve_sampler("euler_ancestral", "simple") == "euler_a"
    assert genserve_sampler("dpmpp_2m", "karras") == "dpmpp_2m_karras"
    assert genserve_sampler("dpmpp_2m", "normal") == "dpmpp_2m"
    assert genserve_sampler("uni_pc", "sgm_uniform") == "unipc"
    assert genserve_sampler("ddim", "ddim_uniform") == "ddim"


@pytest.mark.parametrize(
    ("sampler", "scheduler", "blamed"),
    [("lms", "normal", "sampler_name"), ("dpmpp_2m_sde", "karras", "sampler_name"),
     ("euler", "karras", "scheduler"), ("euler", "exponential", "scheduler")],
)  # fmt: skip
def test_samplers_without_an_equivalent_are_refused_naming_the_input(
    sampler: str, scheduler: str, blamed: str
) -> None:
    with pytest.raises(SamplerMappingError) as caught:
        genserve_sampler(sampler, scheduler)
    assert caught.value.input == blamed
    graph = txt2img(sampler=sampler, scheduler=scheduler)
    assert errors_of(graph) == [("3", "KSampler", blamed)]


def test_denoise_runs_the_last_steps_of_a_steps_over_denoise_schedule() -> None:
    """ComfyUI: `steps` steps, the end of an int(steps / denoise) schedule. genserve's img2img runs
    the last int(total × strength) steps of `total` (scheduler/cost.py, engine/loop/row.py)."""
    for steps in range(1, 60):
        for denoise in (0.05, 0.1, 0.25, 0.3, 1 / 3, 0.45, 0.5, 0.55, 0.6, 0.7, 0.75, 0.8, 0.9, 0.99, 1.0):
            total, strength = denoise_to_strength(steps, denoise)
            assert 0 < strength <= 1
            expected_total = steps if denoise > 0.9999 else max(steps, int(steps / denoise))
            assert total == expected_total, (steps, denoise)
            assert steps_run(total, strength) == steps, (steps, denoise, total, strength)
            if denoise < 0.999:  # the same schedule as genserve's (and A1111's) hires pass
                assert second_pass_schedule(steps, denoise) == (total, total - steps)


def test_ksampler_advanced_start_step_is_a_strength() -> None:
    for steps in range(1, 40):
        for start in range(steps):
            assert steps_run(steps, advanced_to_strength(steps, start)) == steps - start


# -- validation -----------------------------------------------------------------------------------


def test_every_problem_is_reported_with_its_node_and_input() -> None:
    graph = txt2img()
    graph["3"]["inputs"].pop("model")  # missing input
    graph["8"]["inputs"]["vae"] = ["4", 5]  # no such output
    graph["9"]["inputs"]["images"] = ["42", 0]  # no such node
    graph["6"]["inputs"]["clip"] = ["5", 0]  # a LATENT where CLIP goes
    graph["20"] = {"class_type": "FancyUpscaler", "inputs": {}}
    graph["5"]["inputs"]["width"] = "wide"
    found = errors_of(graph)
    assert ("20", "FancyUpscaler", None) in found
    assert ("3", "KSampler", "model") in found
    assert ("8", "VAEDecode", "vae") in found
    assert ("9", "SaveImage", "images") in found
    assert ("6", "CLIPTextEncode", "clip") in found
    assert ("5", "EmptyLatentImage", "width") in found


def test_cycles_and_graphs_without_outputs_are_refused() -> None:
    graph = with_scale(txt2img(), 32, 32)
    graph["8"]["inputs"]["samples"] = ["3", 0]
    graph["3"]["inputs"]["latent_image"] = ["11", 0]
    graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    with pytest.raises(WorkflowError) as caught:
        parse_graph(graph)
    assert caught.value.kind == "dependency_cycle"
    assert {e.node_id for e in caught.value.errors} >= {"3", "8", "10", "11"}
    no_output = txt2img()
    del no_output["9"]
    with pytest.raises(WorkflowError, match="no output node"):
        parse_graph(no_output)


def test_unknown_checkpoints_loras_and_pictures_name_their_node() -> None:
    assert errors_of(txt2img(checkpoint="sdxl_base.safetensors")) == [
        ("4", "CheckpointLoaderSimple", "ckpt_name")
    ]
    assert errors_of(img2img("missing.png", "a red circle", 0.5)) == [("10", "LoadImage", "image")]


# -- the plan -------------------------------------------------------------------------------------


def test_txt2img_is_one_genserve_job() -> None:
    result = plan(txt2img(checkpoint="models/genserve-shapes.ckpt", batch=3, seed=2**40 + 5))
    (stage,) = result.stages.values()
    assert stage.kind == "image" and stage.nodes == ["3", "8"] and stage.main_node == "3"
    assert stage.params == {
        "prompt": "a red circle on a blue background", "negative_prompt": "", "model": "genserve-shapes",
        "seed": 5, "steps": 12, "cfg_scale": 7.0, "sampler": "euler", "num_images": 3, "width": 64, "height": 64,
    }  # fmt: skip


def test_latent_upscale_between_samplers_is_the_hires_pass() -> None:
    (stage,) = plan(with_hires(txt2img(), 96, denoise=0.5, steps=6)).stages.values()
    assert stage.params["hires"] == {
        "width": 96, "height": 96, "upscaler": "latent_nearest", "steps": 6, "strength": 0.5, "sampler": "euler",
    }  # fmt: skip
    assert stage.nodes == ["3", "12", "8"]


def test_a_second_pass_with_another_prompt_is_a_second_job_from_the_first_picture() -> None:
    graph = with_hires(txt2img(), 96, denoise=0.5, steps=6)
    graph["13"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a green circle", "clip": ["4", 1]}}
    graph["12"]["inputs"]["positive"] = ["13", 0]
    first, second = plan(graph).stages.values()
    assert "hires" not in first.params and second.deps == (first.key,)
    assert second.params["init_image"] == f"{STAGE_REF}{first.key}:0"
    assert (second.params["width"], second.params["height"]) == (96, 96)
    assert (second.params["steps"], second.params["strength"]) == denoise_to_strength(6, 0.5)


def test_img2img_and_inpainting_from_a_loaded_picture() -> None:
    (stage,) = plan(img2img("red.png", "a green circle", denoise=0.6, steps=10)).stages.values()
    assert stage.params["init_image"] == PICTURE
    assert (stage.params["width"], stage.params["height"]) == (64, 48)
    assert (stage.params["steps"], stage.params["strength"]) == denoise_to_strength(10, 0.6)
    graph = img2img("red.png", "a green circle", denoise=1.0)
    graph["11"] = {
        "class_type": "VAEEncodeForInpaint",
        "inputs": {"pixels": ["10", 0], "vae": ["4", 2], "mask": ["10", 1], "grow_mask_by": 6},
    }
    (stage,) = plan(graph).stages.values()
    assert stage.params["mask"] == "sha256:" + "2" * 64
    assert stage.params["inpaint"] == {"fill": "latent_nothing", "mask_blur": 6}


def test_lora_controlnet_and_model_upscale_become_genserve_options_and_jobs() -> None:
    graph = txt2img()
    graph["20"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["4", 0], "clip": ["4", 1], "lora_name": "shapes-white-frame.safetensors",
        "strength_model": 0.8, "strength_clip": 0.8}}  # fmt: skip
    graph["3"]["inputs"]["model"] = ["20", 0]
    graph["6"]["inputs"]["clip"] = ["20", 1]
    graph["7"]["inputs"]["clip"] = ["20", 1]
    graph["21"] = {"class_type": "LoadImage", "inputs": {"image": "red.png"}}
    graph["22"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "genserve-shapes-canny"}}
    graph["23"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "control_net": ["22", 0], "image": ["21", 0],
        "strength": 0.9, "start_percent": 0.0, "end_percent": 0.8}}  # fmt: skip
    graph["3"]["inputs"].update(positive=["23", 0], negative=["23", 1])
    graph["24"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "genserve-shapes-2x.pth"}}
    graph["25"] = {
        "class_type": "ImageUpscaleWithModel",
        "inputs": {"upscale_model": ["24", 0], "image": ["8", 0]},
    }
    graph["9"]["inputs"]["images"] = ["25", 0]
    image, upscale = plan(graph).stages.values()
    assert image.params["loras"] == [{"name": "shapes-white-frame", "weight": 0.8}]
    assert image.params["controlnets"] == [
        {"model": "genserve-shapes-canny", "image": PICTURE, "scale": 0.9, "start": 0.0, "end": 0.8}
    ]
    assert upscale.kind == "upscale" and upscale.deps == (image.key,)
    assert upscale.params == {
        "model": "genserve-shapes-2x",
        "scale": 2.0,
        "source": [f"{STAGE_REF}{image.key}:0"],
    }
    graph["20"]["inputs"]["strength_clip"] = 0.5
    assert errors_of(graph) == [("20", "LoraLoader", "strength_clip")]


def test_cache_keys_follow_what_is_computed() -> None:
    """Only the SaveImage prefix or the ImageScale after VAEDecode changed: the sampling stage keeps
    its key (so its finished job is found again); a new seed makes a new key."""
    base = plan(with_scale(txt2img(), 32, 32))
    image_key = next(k for k, s in base.stages.items() if s.kind == "image")
    renamed = plan(with_scale(txt2img(prefix="other"), 48, 40))
    assert image_key in renamed.stages
    scale_key = next(k for k, s in base.stages.items() if s.kind == "scale")
    assert scale_key not in renamed.stages  # the resize itself runs again (in the driver, cheap)
    reseeded = plan(with_scale(txt2img(seed=2), 32, 32))
    assert image_key not in reseeded.stages
    # A LoadImage is keyed by the picture's content: another picture under any name is another job.
    red, blue = (plan(img2img(name, "a green circle", 0.5)) for name in ("red.png", "blue.png"))
    assert set(red.stages).isdisjoint(blue.stages)
    shuffled = copy.deepcopy(txt2img())
    shuffled["99"] = shuffled.pop("3")  # node ids do not enter the keys
    for node in shuffled.values():
        for name, value in node["inputs"].items():
            if value == ["3", 0]:
                node["inputs"][name] = ["99", 0]
    assert set(plan(shuffled).stages) == set(plan(txt2img()).stages)


def test_another_checkpoints_vae_is_refused() -> None:
    """genserve encodes and decodes with the sampling model's own VAE."""
    graph = txt2img()
    graph["20"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "other.ckpt"}}
    graph["8"]["inputs"]["vae"] = ["20", 2]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FakeResources, "models", lambda self: {"genserve-shapes", "other"})
        assert errors_of(graph) == [("8", "VAEDecode", "vae")]
        graph = img2img("red.png", "a green circle", 0.5)
        graph["20"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "other.ckpt"}}
        graph["11"]["inputs"]["vae"] = ["20", 2]
        assert errors_of(graph) == [("3", "KSampler", "latent_image")]


def test_a_partial_schedule_on_an_empty_latent_is_refused() -> None:
    graph = txt2img()
    graph["3"]["inputs"]["denoise"] = 0.5
    assert errors_of(graph) == [("3", "KSampler", "denoise")]


def test_a_failed_or_conflicting_cached_job_is_no_hit_and_the_next_request_id_is_tried() -> None:
    """wf:<key> failed -> wf:<key>.1; taken with another picture (409) -> wf:<key>.2; found there."""
    from types import SimpleNamespace

    from genserve.schemas import JobState
    from genserve.store.jobs import IdempotencyConflict
    from genserve.workflows.runner import Driver, StageFailed

    tried: list[str] = []

    def submit(request_id: str):
        tried.append(request_id)
        if request_id.endswith(".1"):
            raise IdempotencyConflict("other", request_id)
        state = JobState.failed if len(tried) == 1 else JobState.succeeded
        return SimpleNamespace(state=state), False

    driver = Driver(None, None, None, lambda *a: None, lambda *a: None)  # type: ignore[arg-type]
    job, hit = driver._submit(submit, "ab" * 32, "3")
    assert tried == ["wf:" + "ab" * 32, "wf:" + "ab" * 32 + ".1", "wf:" + "ab" * 32 + ".2"]
    assert job.state == JobState.succeeded and hit

    def always_conflicts(request_id: str):
        raise IdempotencyConflict("other", request_id)

    with pytest.raises(StageFailed) as caught:
        driver._submit(always_conflicts, "cd" * 32, "3")
    assert caught.value.node == "3"


def test_a_branch_that_reaches_no_output_is_checked_but_not_run() -> None:
    graph = txt2img()
    graph["30"] = copy.deepcopy(graph["3"])
    graph["30"]["inputs"]["seed"] = 99
    graph["31"] = {"class_type": "VAEDecode", "inputs": {"samples": ["30", 0], "vae": ["4", 2]}}
    (stage,) = plan(graph).stages.values()
    assert stage.params["seed"] == 1
    graph["30"]["inputs"]["sampler_name"] = "lms"
    assert errors_of(graph) == [("30", "KSampler", "sampler_name")]


def sdxl_base_and_refiner(end: int = 20, steps: int = 25) -> dict:
    """ComfyUI's SDXL template: base KSamplerAdvanced to `end` with leftover noise, refiner from there."""
    graph = txt2img(checkpoint="sdxl-base.safetensors")
    graph["3"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            "model": ["4", 0],
            "add_noise": "enable",
            "noise_seed": 4,
            "steps": steps,
            "cfg": 7.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
            "start_at_step": 0,
            "end_at_step": end,
            "return_with_leftover_noise": "enable",
        },
    }
    graph["20"] = {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "sdxl-refiner.safetensors"},
    }
    graph["21"] = {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": graph["6"]["inputs"]["text"], "clip": ["20", 1]},
    }
    graph["22"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["20", 1]}}
    graph["23"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            **graph["3"]["inputs"],
            "model": ["20", 0],
            "add_noise": "disable",
            "positive": ["21", 0],
            "negative": ["22", 0],
            "latent_image": ["3", 0],
            "start_at_step": end,
            "end_at_step": 10000,
            "return_with_leftover_noise": "disable",
        },
    }
    graph["8"]["inputs"].update(samples=["23", 0], vae=["20", 2])
    return graph  # fmt: skip


def test_a_base_and_refiner_pair_is_one_job_with_genserves_refiner(monkeypatch) -> None:
    monkeypatch.setattr(FakeResources, "models", lambda self: {"sdxl-base", "sdxl-refiner"})
    (stage,) = plan(sdxl_base_and_refiner(end=20, steps=25)).stages.values()
    assert stage.params["model"] == "sdxl-base" and stage.params["steps"] == 25
    assert stage.params["refiner"] == {"model": "sdxl-refiner", "switch_at": 0.8}
    assert stage.nodes == ["3", "23", "8"] and stage.main_node == "23"
    graph = sdxl_base_and_refiner()
    graph["23"]["inputs"]["start_at_step"] = 15
    assert errors_of(graph) == [("23", "KSamplerAdvanced", "start_at_step")]
    graph = sdxl_base_and_refiner()
    graph["21"]["inputs"]["text"] = "something else"
    assert errors_of(graph) == [("23", "KSamplerAdvanced", "positive")]
    graph = sdxl_base_and_refiner()
    graph["8"]["inputs"]["samples"] = ["3", 0]  # decoding the noisy half
    assert ("8", "VAEDecode", "samples") in errors_of(graph)


# -- video ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("save", "extension", "output"),
    [
        ("SaveAnimatedWEBP", "webp", {"container": "webp"}),
        ("SaveAnimatedPNG", "png", {"container": "webp"}),
        ("SaveWEBM", "webm", {"container": "webm", "codec": "vp9", "crf": 32}),
        ("SaveVideo", "mp4", {"container": "mp4", "codec": "h264"}),
    ],
)
def test_a_video_latent_on_a_video_model_is_one_video_job_encoded_as_the_save_node_says(
    save: str, extension: str, output: dict
) -> None:
    graph = txt2video("a red circle moves right", length=17, size=64, steps=5, seed=9, save=save)
    graph["3"]["inputs"]["cfg"] = 6.5
    graph["7"]["inputs"]["text"] = "blurry"
    planned = plan(graph)
    (stage,) = planned.stages.values()
    assert stage.kind == "video" and stage.main_node == "3"
    assert stage.params == {
        "prompt": "a red circle moves right", "negative_prompt": "blurry", "model": "genserve-shapes-motion",
        "mode": "t2v", "seed": 9, "steps": 5, "guidance": 6.5, "num_frames": 17, "width": 64, "height": 64,
        "fps": 8, "output": output,
    }  # fmt: skip
    (out,) = planned.outputs
    assert (out.node, out.extension, out.video, out.images.stage) == ("9", extension, True, stage.key)
    assert stage.nodes[:2] == ["3", "8"]


def test_video_and_image_latents_and_save_nodes_do_not_mix() -> None:
    # A video latent into an image model's KSampler, an image latent into a video model's.
    assert errors_of(txt2video(checkpoint="genserve-shapes.safetensors")) == [
        ("3", "KSampler", "latent_image")
    ]
    image_latent = txt2video()
    image_latent["5"] = {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1},
    }
    assert errors_of(image_latent) == [("3", "KSampler", "latent_image")]
    # A clip into SaveImage; a picture into SaveAnimatedWEBP; a video model in KSamplerAdvanced.
    into_save_image = txt2video()
    into_save_image["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}}
    assert errors_of(into_save_image) == [("9", "SaveImage", "images")]
    picture_as_clip = txt2img()
    picture_as_clip["9"] = txt2video()["9"]
    assert errors_of(picture_as_clip) == [("9", "SaveAnimatedWEBP", "images")]
    # An unmappable sampler, one the model does not run, a batch, a fractional fps.
    for change, blamed in (
        ({"sampler_name": "lms"}, ("3", "KSampler", "sampler_name")),
        ({"sampler_name": "euler"}, ("3", "KSampler", "sampler_name")),
        ({"scheduler": "karras"}, ("3", "KSampler", "scheduler")),
    ):
        graph = txt2video()
        graph["3"]["inputs"].update(change)
        assert errors_of(graph) == [blamed], change
    batch = txt2video()
    batch["5"]["inputs"]["batch_size"] = 2
    assert errors_of(batch) == [("5", "EmptyHunyuanLatentVideo", "batch_size")]
    fractional = txt2video()
    fractional["9"]["inputs"]["fps"] = 7.5
    assert errors_of(fractional) == [("9", "SaveAnimatedWEBP", "fps")]
    # A model whose family picks its own scheduler takes any mappable sampler.
    wan = txt2video(checkpoint="wan-tiny", latent="EmptyLTXVLatentVideo", length=25)
    wan["3"]["inputs"].update(sampler_name="uni_pc", scheduler="simple")
    assert next(iter(plan(wan).stages.values())).params["num_frames"] == 25
