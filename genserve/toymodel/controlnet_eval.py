"""The held-out evaluation of a canny ControlNet for genserve-shapes.

Each case is a held-out (shape, fg, bg) triple. The prompt names the shape and both colours but
neither position nor size ("a red circle on a black background"); the control map is the canny edge
map of the same shape drawn at a chosen position and size. The generated picture is measured with
the plain pixel statistics (`pixels.measure`) and the shape classifier:

- centred: issue 18's bar: the drawn shape's centroid lies within `CENTRE_PX` pixels of the control
  shape's centroid (the scene the map was made from, drawn filled) and the shape classifier reads the
  map's shape;
- layout: the measured position AND size equal the control scene's (chance is about 1/10: five
  positions, two sizes);
- prompt: the measured background, foreground and shape equal the prompt's.

Run without the control the same prompts and seeds give the baseline layout rate.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from genserve.engine.conditioning.preprocess import canny
from genserve.toymodel import dataset
from genserve.toymodel.pixels import foreground_centre, measure

CENTRE_PX = 6.0  # issue 18: the drawn shape's centre within 6 px of the control's

# generate(captions, control maps or None, seeds) -> one uint8 (H, W, 3) image per case
ControlGenerate = Callable[[Sequence[str], Sequence[np.ndarray] | None, Sequence[int]], list[np.ndarray]]


@dataclass(frozen=True)
class ControlReport:
    images: int
    centred: float  # centre within CENTRE_PX of the control shape's, and the map's shape class
    layout: float  # position and size both follow the control map
    position: float
    size: float
    background: float
    foreground: float
    shape: float

    def summary(self) -> str:
        return (
            f"centred {self.centred:.3f} layout {self.layout:.3f} pos {self.position:.3f} size {self.size:.3f} | bg {self.background:.3f} "
            f"fg {self.foreground:.3f} shape {self.shape:.3f} (n={self.images})"
        )


def control_scenes(count: int = 40, seed: int = 7) -> list[dataset.Scene]:
    """Held-out triples, each at a seeded position and size (every position and size appears)."""
    rng = random.Random(seed)
    return [
        dataset.Scene(shape, fg, bg, dataset.POSITIONS[i % len(dataset.POSITIONS)], rng.choice(dataset.SIZES))
        for i, (shape, fg, bg) in enumerate(dataset.held_out_triples(count))
    ]


def layout_free_caption(scene: dataset.Scene) -> str:
    """The prompt: shape and colours, no position, no size."""
    return f"a {scene.fg} {scene.shape} on a {scene.bg} background"


def control_map(scene: dataset.Scene, resolution: int = 64) -> np.ndarray:
    """The canny edge map (uint8 RGB) of the scene drawn exactly at its position and size."""
    return canny(np.asarray(dataset.draw_scene(scene, resolution)))


def score(
    scenes: Sequence[dataset.Scene], images: Sequence[np.ndarray], shapes: Sequence[str]
) -> ControlReport:
    hits = dict.fromkeys(("centred", "layout", "position", "size", "background", "foreground", "shape"), 0)
    for scene, image, shape in zip(scenes, images, shapes, strict=True):
        m = measure(image)
        drawn, wanted = (
            foreground_centre(image),
            foreground_centre(np.asarray(dataset.draw_scene(scene, image.shape[0]))),
        )
        near = (
            drawn is not None
            and wanted is not None
            and np.hypot(drawn[0] - wanted[0], drawn[1] - wanted[1]) <= CENTRE_PX
        )
        hits["centred"] += near and shape == scene.shape
        hits["position"] += m.position == scene.position
        hits["size"] += m.size == scene.size
        hits["layout"] += m.position == scene.position and m.size == scene.size
        hits["background"] += m.bg == scene.bg
        hits["foreground"] += m.fg == scene.fg
        hits["shape"] += shape == scene.shape
    n = len(scenes)
    return ControlReport(n, **{k: v / n for k, v in hits.items()})


def evaluate(
    generate: ControlGenerate,
    classify: Callable[[list[np.ndarray]], list[str]],
    scenes: Sequence[dataset.Scene],
    seeds: Sequence[int] = (0,),
    with_control: bool = True,
) -> ControlReport:
    cases = [(scene, seed) for scene in scenes for seed in seeds]
    maps = [control_map(s) for s, _ in cases] if with_control else None
    images = generate([layout_free_caption(s) for s, _ in cases], maps, [seed for _, seed in cases])
    return score([s for s, _ in cases], images, classify(images))


def engine_generator(
    base: str = "genserve-shapes", control: str = "genserve-shapes-canny", batch: int = 40, scale: float = 1.0
) -> ControlGenerate:
    """A `ControlGenerate` through genserve's serving path: the built-in models, the Engine, a batch of
    rows (with and without control rows share it), the model card's steps, sampler and CFG."""
    import hashlib

    import PIL.Image

    from genserve.engine.engine import Engine
    from genserve.engine.loop.denoise import BatchItem
    from genserve.engine.models.controls import scan_controls
    from genserve.engine.models.registry import BUILTIN_MODELS_DIR, read_model_info
    from genserve.schemas.generation import GenerationParams

    info = read_model_info(BUILTIN_MODELS_DIR / base)
    engine = Engine(
        {info.name: info}, device="cpu", dtype="float32", controls=scan_controls(BUILTIN_MODELS_DIR)
    )

    def generate(
        captions: Sequence[str], maps: Sequence[np.ndarray] | None, seeds: Sequence[int]
    ) -> list[np.ndarray]:
        items = []
        for k, (caption, seed) in enumerate(zip(captions, seeds, strict=True)):
            units, images = None, {}
            if maps is not None:
                ref = "sha256:" + hashlib.sha256(maps[k].tobytes()).hexdigest()
                images = {ref: PIL.Image.fromarray(maps[k])}
                units = [{"model": control, "image": ref, "scale": scale}]
            params = GenerationParams(
                prompt=caption,
                model=info.name,
                seed=seed,
                steps=info.request_steps,
                sampler=info.request_sampler,
                cfg_scale=info.request_cfg_scale,
                width=info.native_width,
                height=info.native_height,
                controlnets=units,
            )
            items.append(BatchItem(params, control_images=images))
        out: list[np.ndarray] = []
        for start in range(0, len(items), batch):
            for outcome in engine.generate_batch(items[start : start + batch]):
                out.extend(np.asarray(image.convert("RGB")) for image in outcome.images)
        return out

    return generate


def evaluate_builtin(count: int = 40, seeds: Sequence[int] = (0,)) -> tuple[ControlReport, ControlReport]:
    """(with control, without) on the held-out cases, through the Engine with the built-in models."""
    import torch

    from genserve.engine.models.registry import BUILTIN_MODELS_DIR
    from genserve.toymodel.shapes_classifier import CLASSIFIER_FILE, classify_shapes, load_classifier

    classifier = load_classifier(BUILTIN_MODELS_DIR / "genserve-shapes" / "eval" / CLASSIFIER_FILE).eval()
    generate = engine_generator()
    scenes = control_scenes(count)
    with torch.inference_mode():
        classify = lambda images: classify_shapes(classifier, images)  # noqa: E731
        controlled = evaluate(generate, classify, scenes, seeds)
        plain = evaluate(generate, classify, scenes, seeds, with_control=False)
    return controlled, plain


if __name__ == "__main__":
    for name, report in zip(("with control", "without"), evaluate_builtin(), strict=True):
        print(f"{name}: {report.summary()}")
