"""The held-out quality evaluation of a shapes pipeline.

40 held-out captions (shape/colour combinations training never saw) x 2 seeds are generated at 20
steps and the model's default CFG. Each image is measured with plain pixel statistics (`pixels`)
and the shape classifier (`shapes_classifier`); the report gives the fraction of images whose
background, foreground, shape, position and size match the caption. A colour-swap control asks
for scene pairs that differ only by swapped foreground and background colours, with the same seed,
and checks that the colours follow the text.

Run it from the command line on a saved pipeline folder:

    .venv/bin/python -m genserve.toymodel.evaluate genserve/builtin_models/genserve-shapes
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from genserve.toymodel import dataset
from genserve.toymodel.pixels import measure

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from genserve.engine.engine import Engine
    from genserve.engine.models.registry import ModelInfo

DEFAULT_CFG = 4.0
DEFAULT_STEPS = 20
EVAL_SEEDS = (0, 1)
SPLIT_FILE = "eval/heldout.json"

# generate(captions, seeds) -> one uint8 (H, W, 3) image per (caption, seed) pair, in that order.
Generate = Callable[[Sequence[str], Sequence[int]], list[np.ndarray]]


@dataclass(frozen=True)
class EvalReport:
    images: int
    background: float
    foreground: float
    shape: float
    position: float
    size: float
    swap_background: float  # colour-swap control: fraction of swapped-colour prompts with the right
    swap_foreground: float  # background / foreground (same seed for both prompts of each pair)

    def summary(self) -> str:
        return (
            f"bg {self.background:.3f} fg {self.foreground:.3f} shape {self.shape:.3f} "
            f"pos {self.position:.3f} size {self.size:.3f} | swap bg {self.swap_background:.3f} "
            f"fg {self.swap_foreground:.3f} (n={self.images})"
        )


def held_out_scenes(count: int = 40, seed: int = 99) -> list[dataset.Scene]:
    """One scene per held-out triple, with a fixed position and size each."""
    rng = random.Random(seed)
    return [
        dataset.Scene(shape, fg, bg, rng.choice(dataset.POSITIONS), dataset.SIZES[i % 2])
        for i, (shape, fg, bg) in enumerate(dataset.held_out_triples(count))
    ]


def swap_pairs(seed: int = 5) -> list[tuple[dataset.Scene, dataset.Scene]]:
    """Scene pairs that differ only by swapped colours (colours valid as foreground and background)."""
    rng = random.Random(seed)
    shared = [c for c in dataset.FOREGROUNDS if c in dataset.BACKGROUNDS]
    pairs = []
    for shape in dataset.SHAPES:
        for i, a in enumerate(shared):
            for b in shared[i + 1 :]:
                position, size = rng.choice(dataset.POSITIONS), rng.choice(dataset.SIZES)
                pairs.append(
                    (dataset.Scene(shape, a, b, position, size), dataset.Scene(shape, b, a, position, size))
                )
    return pairs


def score(
    scenes: Sequence[dataset.Scene], images: Sequence[np.ndarray], shapes: Sequence[str]
) -> dict[str, float]:
    """Fractions of images whose measured attributes match their scene."""
    hits = {"background": 0, "foreground": 0, "shape": 0, "position": 0, "size": 0}
    for scene, image, shape in zip(scenes, images, shapes, strict=True):
        m = measure(image)
        hits["background"] += m.bg == scene.bg
        hits["foreground"] += m.fg == scene.fg
        hits["shape"] += shape == scene.shape
        hits["position"] += m.position == scene.position
        hits["size"] += m.size == scene.size
    return {key: value / len(scenes) for key, value in hits.items()}


def evaluate(
    generate: Generate,
    classify: Callable[[list[np.ndarray]], list[str]],
    scenes: Sequence[dataset.Scene],
    seeds: Sequence[int] = EVAL_SEEDS,
    swap_control: bool = True,
) -> EvalReport:
    """Generate every scene's canonical caption with every seed and score the images."""
    jobs = [(scene, seed) for scene in scenes for seed in seeds]
    images = generate([dataset.canonical_caption(s) for s, _ in jobs], [seed for _, seed in jobs])
    main = score([s for s, _ in jobs], images, classify(images))
    swap_bg = swap_fg = float("nan")
    if swap_control:
        # Same seed for both scenes of a pair: the noise is identical, only the prompt differs.
        swaps = [scene for pair in swap_pairs() for scene in pair]
        swap_images = generate([dataset.canonical_caption(s) for s in swaps], [seeds[0]] * len(swaps))
        swap = score(swaps, swap_images, classify(swap_images))
        swap_bg, swap_fg = swap["background"], swap["foreground"]
    return EvalReport(len(images), **main, swap_background=swap_bg, swap_foreground=swap_fg)


def pipeline_generator(
    pipe: StableDiffusionPipeline, cfg: float = DEFAULT_CFG, steps: int = DEFAULT_STEPS, batch: int = 40
) -> Generate:
    """A `Generate` function over a diffusers pipeline, one CPU generator per image seed."""
    import torch

    def generate(captions: Sequence[str], seeds: Sequence[int]) -> list[np.ndarray]:
        images: list[np.ndarray] = []
        for start in range(0, len(captions), batch):
            chunk = slice(start, start + batch)
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[chunk]]
            out = pipe(
                list(captions[chunk]),
                num_inference_steps=steps,
                guidance_scale=cfg,
                generator=generators,
                output_type="np",
            ).images
            images.extend((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
        return images

    return generate


def engine_images(
    engine: Engine,
    info: ModelInfo,
    captions: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    batch: int,
    **params: Any,
) -> list[np.ndarray]:
    """RGB pictures of (caption, seed) pairs at the model's native size through genserve's Engine,
    `batch` requests at a time, as a worker batches them (each row keeps its own seed and noise; a
    row's pixels match the same request alone to within 1/255). `params`: further GenerationParams
    fields (cfg_scale, sampler, loras); left out, they are the model card's, as in a request."""
    import torch

    from genserve.engine.loop.denoise import BatchItem
    from genserve.schemas.generation import GenerationParams

    pairs = list(zip(captions, seeds, strict=True))
    images: list[np.ndarray] = []
    for start in range(0, len(pairs), batch):
        items = [
            BatchItem(
                GenerationParams(
                    prompt=caption,
                    model=info.name,
                    seed=seed,
                    steps=steps,
                    width=info.native_width,
                    height=info.native_height,
                    **params,
                )
            )
            for caption, seed in pairs[start : start + batch]
        ]
        with torch.inference_mode():
            for outcome in engine.generate_batch(items):
                images.extend(np.asarray(image.convert("RGB")) for image in outcome.images)
    return images


def engine_generator(
    folder: Path, cfg: float | None = None, steps: int = DEFAULT_STEPS, sampler: str = "euler", batch: int = 8
) -> Generate:
    """A `Generate` function through genserve's serving path: the registry and the Engine
    (`engine_images`, `batch` requests at a time: half the CPU time of one at a time on 2 cores).

    `cfg=None` leaves the CFG scale to the model, as a request that names none: its card's default.
    """
    from genserve.engine.engine import Engine
    from genserve.engine.models.registry import read_model_info

    info = read_model_info(folder)
    engine = Engine({info.name: info}, device="cpu", dtype="float32")

    def generate(captions: Sequence[str], seeds: Sequence[int]) -> list[np.ndarray]:
        return engine_images(
            engine, info, captions, seeds, steps=steps, batch=batch, cfg_scale=cfg, sampler=sampler
        )

    return generate


def evaluate_folder(
    folder: Path, cfg: float | None = None, steps: int = DEFAULT_STEPS, sampler: str = "euler", batch: int = 8
) -> EvalReport:
    """Evaluate a saved pipeline folder through genserve's Engine with its committed shape classifier."""
    import torch

    from genserve.toymodel.shapes_classifier import CLASSIFIER_FILE, classify_shapes, load_classifier

    classifier = load_classifier(folder / "eval" / CLASSIFIER_FILE)
    with torch.inference_mode():
        return evaluate(
            engine_generator(folder, cfg, steps, sampler, batch),
            lambda images: classify_shapes(classifier, images),
            held_out_scenes(),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="Held-out quality evaluation of a shapes pipeline.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--cfg", type=float, default=None, help="default: the model card's")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--sampler", default="euler")
    args = parser.parse_args()
    report = evaluate_folder(args.folder, args.cfg, args.steps, args.sampler)
    print(report.summary())
    print(json.dumps(asdict(report)))


if __name__ == "__main__":
    main()
