"""A small CNN that names the shape in a picture, used only to *check* generated images.

It is trained on procedurally drawn images (never on generated ones), so the model under test cannot
influence it. Its input is a colour-free "foreground map" (distance of each pixel from the measured
background colour), which makes it indifferent to the colour combination and lets it judge shape
alone.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from genserve.toymodel import dataset
from genserve.toymodel.pixels import foreground_map

CLASSIFIER_FILE = "shape_classifier.safetensors"


class ShapeClassifier(nn.Module):
    def __init__(self, classes: int = len(dataset.SHAPES)) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.features = nn.Sequential(block(1, 16), block(16, 32), block(32, 64), block(64, 64))
        self.head = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        # Average and max pooling together: position-free, yet sensitive to small shapes.
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1))


def _augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur and noise, so the classifier also copes with soft, imperfect generated shapes."""
    out = image.astype(np.float32)
    if rng.random() < 0.5:
        t = torch.from_numpy(out).permute(2, 0, 1)[None]
        t = nn.functional.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False)
        out = t[0].permute(1, 2, 0).numpy()
    out += rng.normal(0, rng.uniform(0, 12), out.shape)
    return np.clip(out, 0, 255)


def make_batch(
    count: int, resolution: int, rng: random.Random, np_rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground maps of random drawn scenes (all triples: shape is judged alone) and their labels."""
    triples = dataset.all_triples()
    scenes = [dataset.sample_scene(rng, triples, small_bias=0.5) for _ in range(count)]
    images = [_augment(np.asarray(dataset.draw_scene(s, resolution, rng)), np_rng) for s in scenes]
    maps = torch.stack([torch.from_numpy(foreground_map(img)) for img in images])[:, None]
    labels = torch.tensor([dataset.SHAPES.index(s.shape) for s in scenes])
    return maps, labels


def train_classifier(
    resolution: int, steps: int = 800, seed: int = 7, log: Callable[[str], None] = print
) -> ShapeClassifier:
    """Train on a pool of drawn, augmented images (drawn once: drawing is the slow part on CPU)."""
    torch.manual_seed(seed)
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    pool_maps, pool_labels = make_batch(6000, resolution, rng, np_rng)
    model = ShapeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        index = torch.randint(len(pool_maps), (64,))
        loss = nn.functional.cross_entropy(model(pool_maps[index]), pool_labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"classifier step {step} loss {loss.item():.4f}")
    model.eval()
    maps, labels = make_batch(1000, resolution, rng, np_rng)
    with torch.no_grad():
        accuracy = (model(maps).argmax(1) == labels).float().mean().item()
    log(f"classifier accuracy on fresh drawn images: {accuracy:.3f}")
    return model


def save_classifier(model: ShapeClassifier, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_classifier(path: Path) -> ShapeClassifier:
    model = ShapeClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


@torch.no_grad()
def classify_shapes(model: ShapeClassifier, images: list[np.ndarray]) -> list[str]:
    maps = torch.stack([torch.from_numpy(foreground_map(img)) for img in images])[:, None]
    return [dataset.SHAPES[i] for i in model(maps).argmax(1).tolist()]
