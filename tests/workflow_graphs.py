"""ComfyUI API-format workflows for the workflow tests: the default txt2img graph ComfyUI's
"Save (API)" writes, and variations of it."""

from __future__ import annotations

import copy
from typing import Any


def txt2img(
    prompt: str = "a red circle on a blue background",
    seed: int = 1,
    steps: int = 12,
    size: int = 64,
    batch: int = 1,
    checkpoint: str = "genserve-shapes.safetensors",
    sampler: str = "euler",
    scheduler: str = "normal",
    prefix: str = "ComfyUI",
) -> dict[str, Any]:
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": sampler, "scheduler": scheduler,
                "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
            "_meta": {"title": "KSampler"},
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint},
              "_meta": {"title": "Load Checkpoint"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch},
              "_meta": {"title": "Empty Latent Image"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["4", 1]},
              "_meta": {"title": "CLIP Text Encode (Prompt)"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]},
              "_meta": {"title": "CLIP Text Encode (Negative)"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]},
              "_meta": {"title": "VAE Decode"}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]},
              "_meta": {"title": "Save Image"}},
    }  # fmt: skip


def with_scale(graph: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    """An ImageScale between VAEDecode and SaveImage."""
    graph = copy.deepcopy(graph)
    graph["10"] = {
        "class_type": "ImageScale",
        "inputs": {"image": ["8", 0], "upscale_method": "bilinear", "width": width, "height": height, "crop": "disabled"},
    }  # fmt: skip
    graph["9"]["inputs"]["images"] = ["10", 0]
    return graph


def with_hires(graph: dict[str, Any], size: int, denoise: float = 0.5, steps: int = 6) -> dict[str, Any]:
    """KSampler → LatentUpscale → KSampler (ComfyUI's "hires fix" graph)."""
    graph = copy.deepcopy(graph)
    graph["11"] = {
        "class_type": "LatentUpscale",
        "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact", "width": size, "height": size, "crop": "disabled"},
    }  # fmt: skip
    second = copy.deepcopy(graph["3"])
    second["inputs"].update(latent_image=["11", 0], denoise=denoise, steps=steps, seed=7)
    graph["12"] = second
    graph["8"]["inputs"]["samples"] = ["12", 0]
    return graph


def img2img(picture: str, prompt: str, denoise: float, steps: int = 10, seed: int = 1) -> dict[str, Any]:
    graph = txt2img(prompt, seed=seed, steps=steps)
    del graph["5"]
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": picture, "upload": "image"}}
    graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    graph["3"]["inputs"].update(latent_image=["11", 0], denoise=denoise)
    return graph


def txt2video(
    prompt: str = "a red circle moves right on a blue background",
    length: int = 16,
    size: int = 64,
    steps: int = 4,
    seed: int = 1,
    checkpoint: str = "genserve-shapes-motion",
    latent: str = "EmptyHunyuanLatentVideo",
    save: str = "SaveAnimatedWEBP",
) -> dict[str, Any]:
    """ComfyUI's Wan text-to-video template on a genserve video model: a video latent into the
    KSampler, VAEDecode, then a save node (`save`; SaveVideo gets a CreateVideo before it)."""
    graph = txt2img(prompt, seed=seed, steps=steps, checkpoint=checkpoint, sampler="dpmpp_2m")
    graph["5"] = {
        "class_type": latent,
        "inputs": {"width": size, "height": size, "length": length, "batch_size": 1},
    }
    saves = {
        "SaveAnimatedWEBP": {"fps": 8.0, "lossless": False, "quality": 80, "method": "default"},
        "SaveAnimatedPNG": {"fps": 8.0, "compress_level": 4},
        "SaveWEBM": {"codec": "vp9", "fps": 8.0, "crf": 32.0},
    }
    if save == "SaveVideo":
        graph["10"] = {"class_type": "CreateVideo", "inputs": {"images": ["8", 0], "fps": 8.0}}
        graph["9"] = {
            "class_type": "SaveVideo",
            "inputs": {
                "video": ["10", 0],
                "filename_prefix": "video/ComfyUI",
                "format": "auto",
                "codec": "auto",
            },
        }
    else:
        graph["9"] = {
            "class_type": save,
            "inputs": {"images": ["8", 0], "filename_prefix": "clip", **saves[save]},
        }
    return graph  # fmt: skip
