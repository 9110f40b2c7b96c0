"""From an experiment's finished jobs to its results: per-image metrics, per-variant time and cost, and
each variant's paired comparison with variant A over the seeds."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from genserve.experiments import metrics, scorers
from genserve.experiments.spec import ExperimentSpec
from genserve.experiments.stats import MIN_PAIRS_FOR_5_PERCENT, PairedResult, compare_paired
from genserve.schemas import JobState
from genserve.store.jobs import JobRecord

# Metric key → (label, whether higher is better). The *_vs_a metrics have no test: A against itself
# is 0 (MSE) or 1 (SSIM) by definition, so there is nothing to pair them with.
METRICS = {
    "mse_ref": ("MSE vs reference", False),
    "ssim_ref": ("SSIM vs reference", True),
    "mse_vs_a": ("MSE vs A (same seed)", False),
    "ssim_vs_a": ("SSIM vs A (same seed)", True),
    "shape": ("shape score", True),
    "colour": ("colour score", True),
    "clip": ("CLIP score", True),
}
UNPAIRED = ("mse_vs_a", "ssim_vs_a")


@dataclass
class Cell:
    variant: int
    seed: int
    state: str
    job_id: str | None = None
    error: str | None = None
    seconds: float | None = None  # the job's run, started → finished (jobs batched together share it)
    gpu_seconds: float | None = None  # the cost model's estimate for this image alone
    png: bytes | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    detected: str | None = None  # what the pixels show: "red circle on white"


@dataclass
class VariantSummary:
    name: str
    params: dict
    done: int
    failed: int
    mean_seconds: float | None
    gpu_seconds_per_image: float | None
    cost_per_image: float | None  # at the spec's gpu_price_per_hour
    means: dict[str, float]
    sds: dict[str, float]


@dataclass
class Comparison:
    metric: str
    variant: str
    baseline_mean: float
    variant_mean: float
    test: PairedResult


@dataclass
class ExperimentResults:
    name: str
    seeds: list[int]
    variants: list[VariantSummary]
    cells: list[list[Cell]]  # [seed index][variant index]
    metrics: list[str]  # the metric keys with at least one value, in METRICS order
    comparisons: list[Comparison]
    notes: list[str]
    done: bool
    counts: dict[str, int]

    def to_json(self) -> dict:
        """Everything but the pictures (which the report embeds)."""
        data = asdict(self)
        for row in data["cells"]:
            for cell in row:
                cell.pop("png")
        return data


def analyse(
    spec: ExperimentSpec,
    jobs: dict[tuple[int, int], JobRecord | None],
    read_png: Callable[[str], bytes | None],
    reference_png: bytes | None,
    models_dir: Path,
) -> ExperimentResults:
    """Measure every finished image and compare each variant with A, seed by seed.

    `jobs` maps (variant index, seed index) to the item's job; `read_png` returns an image's bytes
    by image id (None if it is gone)."""
    seeds = spec.seed_list
    notes: list[str] = []
    cells = [
        [_cell(v, seed, jobs.get((v, s)), read_png) for v in range(len(spec.variants))]
        for s, seed in enumerate(seeds)
    ]
    pixels = {(s, v): _rgb(cell.png) for s, row in enumerate(cells) for v, cell in enumerate(row) if cell.png}
    wanted = set(spec.metrics)
    if wanted & {"mse", "ssim"}:
        _pixel_metrics(spec, cells, pixels, reference_png, wanted, notes)
    targets = [
        metrics.parse_target(spec.target or spec.resolved(v).prompt or "") for v in range(len(spec.variants))
    ]
    if wanted & {"shape", "colour"}:
        _content_metrics(cells, pixels, targets, wanted, notes)
    if "clip" in wanted:
        _clip_metric(spec, cells, pixels, models_dir, notes)
    present = [key for key in METRICS if any(key in cell.metrics for row in cells for cell in row)]
    summaries = [_summary(spec, v, [row[v] for row in cells], present) for v in range(len(spec.variants))]
    comparisons = _comparisons(spec, cells, present, summaries)
    if len(seeds) < MIN_PAIRS_FOR_5_PERCENT:
        notes.append(
            f"{len(seeds)} seed(s): the exact two-sided signed-rank test cannot reach p < 0.05 with fewer "
            f"than {MIN_PAIRS_FOR_5_PERCENT} pairs, whatever the effect; see 'seeds needed'."
        )
    states = [cell.state for row in cells for cell in row]
    counts = {"total": len(states), **{state.value: states.count(state.value) for state in JobState}}
    done = all(state in ("succeeded", "failed", "canceled") for state in states)
    failed = [cell for row in cells for cell in row if cell.state in ("failed", "canceled")]
    if failed:
        notes.append(f"{len(failed)} image(s) failed or were canceled; they are left out of the statistics.")
    return ExperimentResults(spec.name, seeds, summaries, cells, present, comparisons, notes, done, counts)


def _cell(variant: int, seed: int, job: JobRecord | None, read_png: Callable[[str], bytes | None]) -> Cell:
    if job is None:
        return Cell(variant, seed, "unknown")
    cell = Cell(
        variant, seed, job.state.value, job.id, job.error if job.state != JobState.succeeded else None
    )
    cell.gpu_seconds = job.estimated_seconds
    if job.started_at and job.finished_at:
        cell.seconds = (job.finished_at - job.started_at).total_seconds()
    if job.state == JobState.succeeded and job.image_ids:
        cell.png = read_png(job.image_ids[0])
    return cell


def _rgb(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _fit(image: np.ndarray, like: np.ndarray) -> np.ndarray:
    """`image` at `like`'s size (bicubic), so two images of different sizes can be compared."""
    if image.shape == like.shape:
        return image
    size = (like.shape[1], like.shape[0])
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


def _pixel_metrics(
    spec: ExperimentSpec,
    cells: list[list[Cell]],
    pixels: dict[tuple[int, int], np.ndarray],
    reference_png: bytes | None,
    wanted: set[str],
    notes: list[str],
) -> None:
    reference = _rgb(reference_png) if reference_png else None
    resized = False
    for (s, v), image in pixels.items():
        if reference is not None:
            other, suffix = _fit(reference, image), "ref"
            resized |= other.shape != reference.shape
        elif v == 0 or (s, 0) not in pixels:
            continue
        else:
            other, suffix = _fit(pixels[(s, 0)], image), "vs_a"
        if "mse" in wanted:
            cells[s][v].metrics[f"mse_{suffix}"] = metrics.mse(image, other)
        if "ssim" in wanted and min(image.shape[:2]) >= metrics.SSIM_WINDOW:
            cells[s][v].metrics[f"ssim_{suffix}"] = metrics.ssim(image, other)
    if resized:
        notes.append("The reference image was resized (bicubic) to each image's size for MSE and SSIM.")
    if reference is None:
        notes.append(
            "No reference image: MSE and SSIM compare each variant with variant A's image of the same "
            "seed (how far the change moved the picture), so they have no paired test."
        )


def _content_metrics(
    cells: list[list[Cell]],
    pixels: dict[tuple[int, int], np.ndarray],
    targets: list[metrics.Target],
    wanted: set[str],
    notes: list[str],
) -> None:
    from genserve.toymodel.pixels import measure

    for (s, v), image in pixels.items():
        found = measure(image)
        cells[s][v].detected = f"{found.fg} shape on {found.bg}" if found.fg else f"plain {found.bg}"
        if "colour" in wanted:
            score = metrics.colour_score(image, targets[v])
            if score is not None:
                cells[s][v].metrics["colour"] = score
    if "shape" in wanted:
        keys = [(s, v) for (s, v) in pixels if targets[v].shape is not None]
        scored = scorers.shape_scores([pixels[k] for k in keys], [targets[k[1]].shape for k in keys])
        for (s, v), (probability, pick) in zip(keys, scored, strict=True):
            cells[s][v].metrics["shape"] = probability
            cells[s][v].detected = (cells[s][v].detected or "").replace("shape", pick, 1)
    if any(target.empty for target in targets):
        notes.append(
            "Shape and colour scores need a prompt (or target) that names a shape or colour of the "
            "default model's vocabulary (circle, square, triangle, star; red, blue, ...); some do not."
        )


def _clip_metric(
    spec: ExperimentSpec,
    cells: list[list[Cell]],
    pixels: dict[tuple[int, int], np.ndarray],
    models_dir: Path,
    notes: list[str],
) -> None:
    folder = scorers.clip_folder(models_dir)
    if folder is None:
        notes.append(
            f"CLIP score skipped: no CLIP model in {Path(models_dir) / scorers.CLIP_FOLDER} (put a "
            "transformers CLIPModel saved with save_pretrained there, with its processor files)."
        )
        return
    keys = list(pixels)
    prompts = [spec.target or spec.resolved(v).prompt or "" for _, v in keys]
    for (s, v), score in zip(
        keys, scorers.clip_scores(folder, [pixels[k] for k in keys], prompts), strict=True
    ):
        cells[s][v].metrics["clip"] = score


def _summary(spec: ExperimentSpec, v: int, column: list[Cell], present: list[str]) -> VariantSummary:
    done = [cell for cell in column if cell.state == "succeeded"]
    seconds = [cell.seconds for cell in done if cell.seconds is not None]
    gpu = [cell.gpu_seconds for cell in done if cell.gpu_seconds is not None]
    gpu_mean = float(np.mean(gpu)) if gpu else None
    price = spec.gpu_price_per_hour
    values = {key: [cell.metrics[key] for cell in done if key in cell.metrics] for key in present}
    return VariantSummary(
        name=spec.variants[v].name,
        params=spec.resolved(v).model_dump(exclude_none=True),
        done=len(done),
        failed=sum(cell.state in ("failed", "canceled") for cell in column),
        mean_seconds=float(np.mean(seconds)) if seconds else None,
        gpu_seconds_per_image=gpu_mean,
        cost_per_image=gpu_mean * price / 3600 if gpu_mean is not None and price is not None else None,
        means={key: float(np.mean(found)) for key, found in values.items() if found},
        sds={key: float(np.std(found, ddof=1)) for key, found in values.items() if len(found) > 1},
    )


def _comparisons(
    spec: ExperimentSpec, cells: list[list[Cell]], present: list[str], summaries: list[VariantSummary]
) -> list[Comparison]:
    """Each variant against A on each paired metric, over the seeds where both have a value."""
    found = []
    for key in present:
        if key in UNPAIRED:
            continue
        for v in range(1, len(spec.variants)):
            pairs = [
                (row[v].metrics[key], row[0].metrics[key])
                for row in cells
                if key in row[v].metrics and key in row[0].metrics
            ]
            if not pairs:
                continue
            variant, baseline = [p[0] for p in pairs], [p[1] for p in pairs]
            found.append(
                Comparison(
                    key,
                    summaries[v].name,
                    float(np.mean(baseline)),
                    float(np.mean(variant)),
                    compare_paired(variant, baseline),
                )
            )
    return found
