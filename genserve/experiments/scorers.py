"""The learned scores of an experiment: the default model's shape classifier, and CLIP when the
operator installed one. Both read local files only; torch is imported when a score is first asked for.

- Shape: the probability the shape classifier (`toymodel/shapes_classifier.py`, shipped with
  genserve-shapes) gives the shape the target names, on the image resized to its training size.
- CLIP score (Hessel et al. 2021, as torchmetrics computes it): 100 × max(cos(E_image, E_text), 0)
  with a `transformers` CLIPModel read from `<models_dir>/clip/` (`save_pretrained` layout: config,
  weights, tokenizer and image processor files). No folder, no score, and the report says so.
"""

from __future__ import annotations

import threading
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from genserve.engine.models.registry import BUILTIN_MODELS_DIR

CLIP_FOLDER = "clip"
CLASSIFIER_PATH = BUILTIN_MODELS_DIR / "genserve-shapes" / "eval" / "shape_classifier.safetensors"
CLASSIFIER_SIZE = 64  # the resolution the classifier was trained at (the model's native size)
_lock = threading.Lock()


def clip_folder(models_dir: Path) -> Path | None:
    """`<models_dir>/clip` when it holds a CLIP model (its config.json), else None."""
    folder = Path(models_dir) / CLIP_FOLDER
    return folder if (folder / "config.json").is_file() else None


@cache
def _classifier(path: Path):  # noqa: ANN202 - a torch module; torch stays out of the signature
    from genserve.toymodel.shapes_classifier import load_classifier

    return load_classifier(path)


def shape_scores(images: list[np.ndarray], shapes: list[str]) -> list[tuple[float, str]]:
    """For each image, (probability of `shapes[i]`, the classifier's own pick)."""
    if not images:
        return []
    import torch

    from genserve.toymodel import dataset
    from genserve.toymodel.pixels import foreground_map

    resized = [_resized(image, CLASSIFIER_SIZE) for image in images]
    with _lock, torch.inference_mode():
        model = _classifier(CLASSIFIER_PATH)
        maps = torch.stack([torch.from_numpy(foreground_map(image)) for image in resized])[:, None]
        probabilities = model(maps).softmax(1)
    picks = probabilities.argmax(1).tolist()
    return [
        (float(probabilities[i, dataset.SHAPES.index(shape)]), dataset.SHAPES[picks[i]])
        for i, shape in enumerate(shapes)
    ]


@cache
def _clip(folder: Path):  # noqa: ANN202 - (model, processor) from transformers
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    return model, CLIPProcessor.from_pretrained(folder, local_files_only=True)


def clip_scores(folder: Path, images: list[np.ndarray], prompts: list[str]) -> list[float]:
    """CLIP score of each image against its prompt, 0..100."""
    if not images:
        return []
    import torch

    with _lock, torch.inference_mode():
        model, processor = _clip(Path(folder))
        inputs = processor(
            text=prompts,
            images=[Image.fromarray(i) for i in images],
            return_tensors="pt",
            padding=True,
            truncation=True,
        )
        # The model's own forward: image_embeds and text_embeds are projected and L2-normalised.
        outputs = model(**inputs)
        cosine = (outputs.image_embeds * outputs.text_embeds).sum(-1)
    return [100.0 * max(float(c), 0.0) for c in cosine]


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
