"""From a spec to items: prompts × variants × n, each one image with a content-derived key.

An item's key is a hash of everything that decides its pixels (model, prompt, negative prompt, size,
steps, CFG, sampler, seed; and for an item that starts from a picture, the picture's and mask's
hashes and the strength). Items with the same key are the same picture: within a spec they are
rendered once, and across specs the job store's idempotency makes them one job.

Pictures are stored before expansion (`store_spec_pictures`), so items name them by hash only.

A `kind: video` spec expands to video items (`expand_video`): each is one resolved video request,
keyed by everything that decides its file (the request as resolved, previews aside).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import string
from dataclasses import dataclass
from pathlib import Path

from genserve.api.pictures import PICTURE_FIELDS, store_pictures
from genserve.api.submission import resolve_params
from genserve.api.video_submission import resolve_video
from genserve.artifacts.inputs import InputStore
from genserve.batch.spec import BatchSpec, PromptFile, PromptItem, PromptTemplate, SpecError, parse_size
from genserve.config import Limits, Settings
from genserve.engine.models.registry import ModelInfo
from genserve.schemas import GenerationParams, LimitError
from genserve.schemas.image_inputs import is_image_hash
from genserve.schemas.video import VideoKeyframe, VideoParams

MAX_REPORTED_ERRORS = 50
KEY_FIELDS = (
    "model",
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "cfg_scale",
    "sampler",
    "seed",
)


@dataclass(frozen=True)
class RenderItem:
    index: int
    key: str
    params: GenerationParams  # resolved; one image


# Only items that start from a picture add these, so txt2img items keep the keys they always had.
PICTURE_KEY_FIELDS = ("init_image", "mask", "strength")


def item_key(params: GenerationParams) -> str:
    fields = KEY_FIELDS + (PICTURE_KEY_FIELDS if params.init_image is not None else ())
    key = {name: getattr(params, name) for name in fields}
    for name in ("upscale", "face_restore"):  # only when set, so other items keep their keys
        if getattr(params, name, None) is not None:
            key[name] = getattr(params, name).model_dump()
    canonical = json.dumps(key, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def read_prompts(spec: BatchSpec, base_dir: Path) -> list[PromptItem]:
    """The prompts in order; a None negative prompt means the spec's default."""
    source = spec.prompts
    if isinstance(source, PromptTemplate):
        # unvalidated: an empty prompt is reported per item by expand, with its place
        return [PromptItem.model_construct(prompt=prompt) for prompt, _ in _fill_template(source)]
    if isinstance(source, PromptFile):
        return _read_prompt_file(base_dir / source.file, source.file)
    return [PromptItem(prompt=entry) if isinstance(entry, str) else entry for entry in source]


def store_spec_pictures(
    spec: BatchSpec, base_dir: Path, pictures: InputStore, limits: Limits, local_files: bool
) -> BatchSpec:
    """The spec with every prompt's pictures stored and named by hash. With `local_files` (a spec
    read on this machine) a picture may be a file relative to `base_dir`; a spec sent to the server
    carries base64, data URLs or upload ids only. Raises SpecError naming each bad picture."""
    if not isinstance(spec.prompts, list):
        return spec
    prompts: list[str | PromptItem] = []
    errors: list[str] = []
    for index, entry in enumerate(spec.prompts):
        if isinstance(entry, PromptItem) and (entry.init_image or entry.mask):
            try:
                probe = GenerationParams(prompt=entry.prompt, init_image=entry.init_image, mask=entry.mask)
                if local_files:
                    probe = probe.model_copy(update=_read_files(probe, base_dir))
                stored = store_pictures(probe, pictures, limits)
            except LimitError as error:
                errors.append(f"prompts[{index}].{error.field}: {error.message}")
                continue
            entry = entry.model_copy(update={"init_image": stored.init_image, "mask": stored.mask})
        prompts.append(entry)
    if errors:
        raise SpecError(errors[:MAX_REPORTED_ERRORS])
    return spec.model_copy(update={"prompts": prompts})


def _read_files(params: GenerationParams, base_dir: Path) -> dict[str, str]:
    """Pictures named by file (not an id or a data URL) as base64."""
    found = {}
    for field in PICTURE_FIELDS:
        value = getattr(params, field)
        if value is None or is_image_hash(value) or value.startswith("data:"):
            continue
        try:
            found[field] = base64.b64encode((base_dir / value).read_bytes()).decode("ascii")
        except OSError as error:
            raise LimitError(field, f"cannot read {value} ({error.strerror})") from None
    return found


def _fill_template(source: PromptTemplate) -> list[tuple[str, str | None]]:
    fields = [name for _, name, _, _ in string.Formatter().parse(source.template) if name]
    missing = [name for name in fields if name not in source.values]
    if missing:
        raise SpecError([f"prompts.values: no values for placeholder(s) {', '.join(missing)}"])
    names = list(dict.fromkeys(fields))
    return [
        (source.template.format(**dict(zip(names, combo, strict=True))), None)
        for combo in itertools.product(*(source.values[name] for name in names))
    ]


def _read_prompt_file(path: Path, shown: str) -> list[PromptItem]:
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise SpecError([f"prompts.file: cannot read {shown} ({error.strerror})"]) from None
    prompts, errors = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                entry = PromptItem.model_validate_json(line)
            except ValueError as error:
                errors.append(f"prompts.file {shown}, line {number}: {str(error).splitlines()[0]}")
                continue
            if entry.init_image or entry.mask:
                errors.append(f"prompts.file {shown}, line {number}: pictures go in inline prompt items")
                continue
            prompts.append(entry)
        else:
            prompts.append(PromptItem.model_construct(prompt=line.strip()))
    if errors:
        raise SpecError(errors[:MAX_REPORTED_ERRORS])
    if not prompts:
        raise SpecError([f"prompts.file: {shown} holds no prompts"])
    return prompts


def variant_rows(spec: BatchSpec) -> list[dict]:
    """Each combination of the variant lists: every one (grid) or element-wise (zip)."""
    variants = spec.variants
    lists = {
        "seed": variants.seed,
        "size": variants.size or [None],
        "steps": variants.steps,
        "cfg_scale": variants.cfg_scale,
        "sampler": variants.sampler,
        "model": variants.model,
        "strength": variants.strength,
    }
    if variants.mode == "grid":
        return [dict(zip(lists, combo, strict=True)) for combo in itertools.product(*lists.values())]
    longest = max(len(values) for values in lists.values())
    uneven = {name: len(values) for name, values in lists.items() if len(values) not in (1, longest)}
    if uneven:
        sizes = ", ".join(f"{name} has {count}" for name, count in uneven.items())
        raise SpecError([f"variants: zip needs lists of one length ({longest}) or of one element; {sizes}"])
    return [{name: values[i % len(values)] for name, values in lists.items()} for i in range(longest)]


def expand(
    spec: BatchSpec,
    base_dir: Path,
    models: dict[str, ModelInfo],
    settings: Settings,
    pictures: InputStore | None = None,
) -> list[RenderItem]:
    """All items of the spec, checked against the same limits as the API; duplicates dropped.

    Its pictures must be stored (`store_spec_pictures`); `pictures` is where their sizes are read."""
    prompts = read_prompts(spec, base_dir)
    rows = variant_rows(spec)
    items: list[RenderItem] = []
    seen: set[str] = set()
    errors: list[str] = []
    for (p, entry), (v, row) in itertools.product(enumerate(prompts), enumerate(rows)):
        negative = entry.negative_prompt
        for k in range(spec.variants.n):
            width, height = parse_size(row["size"]) if row["size"] else (None, None)
            try:
                params = resolve_params(
                    GenerationParams(
                        prompt=entry.prompt,
                        negative_prompt=negative if negative is not None else spec.negative_prompt,
                        init_image=entry.init_image,
                        mask=entry.mask,
                        # txt2img items keep the default: strength neither runs nor keys them
                        strength=row["strength"]
                        if entry.init_image
                        else GenerationParams.model_fields["strength"].default,
                        model=row["model"],
                        seed=row["seed"] + k,
                        steps=row["steps"],
                        cfg_scale=row["cfg_scale"],
                        width=width,
                        height=height,
                        sampler=row["sampler"],
                        num_images=1,
                        preview_every=0,  # nobody watches previews of a batch
                        upscale=spec.post.upscale if spec.post else None,
                        face_restore=spec.post.face_restore if spec.post else None,
                    ),
                    models,
                    settings,
                    pictures,
                )
            except LimitError as error:
                errors.append(f"prompts[{p}] × variants[{v}] (n={k}).{error.field}: {error.message}")
                if len(errors) >= MAX_REPORTED_ERRORS:
                    raise SpecError(errors) from None
                continue
            except ValueError as error:  # pydantic: e.g. a size that is not a multiple of 8
                detail = str(error).splitlines()
                errors.append(f"prompts[{p}] × variants[{v}] (n={k}): {' '.join(detail[1:3]) or detail[0]}")
                continue
            key = item_key(params)
            if key not in seen:
                seen.add(key)
                items.append(RenderItem(index=len(items), key=key, params=params))
    if errors:
        raise SpecError(errors)
    return items


# -- video items ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoItem:
    index: int
    key: str
    params: VideoParams  # resolved: model, frames, fps, size, steps, guidance and seed are set
    segments: int  # 0: one pass


def video_item_key(params: VideoParams) -> str:
    canonical = json.dumps({"video": params.model_dump(exclude={"preview_every"})}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def expand_video(
    spec: BatchSpec, base_dir: Path, models: dict[str, ModelInfo], settings: Settings
) -> list[VideoItem]:
    """A `kind: video` spec's items: prompts × variants × n clips, each checked as POST
    /v1/video/jobs checks it (errors located like image items'); duplicates dropped.

    Its pictures must be stored (`store_spec_pictures`): an i2v item's first frame is named by hash.
    """
    assert spec.video is not None
    video = spec.video
    explicit = spec.variants.model_fields_set  # steps and CFG: the model's defaults unless given
    prompts = read_prompts(spec, base_dir)
    rows = variant_rows(spec)
    items: list[VideoItem] = []
    seen: set[str] = set()
    errors: list[str] = []
    for (p, entry), (v, row) in itertools.product(enumerate(prompts), enumerate(rows)):
        negative = entry.negative_prompt
        for k in range(spec.variants.n):
            width, height = parse_size(row["size"]) if row["size"] else (None, None)
            first = [VideoKeyframe(image=entry.init_image, frame_index=0)] if entry.init_image else []
            where = f"prompts[{p}] × variants[{v}] (n={k})"
            if entry.init_image and video.mode != "i2v":
                errors.append(
                    f"{where}.init_image: a {video.mode} clip starts from no picture; use video.mode i2v"
                )
                continue
            try:
                asked = VideoParams(
                    prompt=entry.prompt,
                    negative_prompt=negative if negative is not None else spec.negative_prompt,
                    model=row["model"],
                    mode=video.mode,
                    keyframes=first if video.mode == "i2v" else [],
                    width=width,
                    height=height,
                    num_frames=video.num_frames,
                    seconds=video.seconds,
                    fps=video.fps,
                    steps=row["steps"] if "steps" in explicit else None,
                    guidance=row["cfg_scale"],
                    seed=row["seed"] + k,
                    long=video.long,
                    post=video.post,
                    output=video.output,
                    preview_every=0,  # nobody watches previews of a batch
                )
                params, segments = resolve_video(asked, models, settings)
            except LimitError as error:
                errors.append(f"{where}.{error.field}: {error.message}")
                if len(errors) >= MAX_REPORTED_ERRORS:
                    raise SpecError(errors) from None
                continue
            except ValueError as error:  # pydantic
                detail = str(error).splitlines()
                errors.append(f"{where}: {' '.join(detail[1:3]) or detail[0]}")
                continue
            key = video_item_key(params)
            if key not in seen:
                seen.add(key)
                items.append(VideoItem(index=len(items), key=key, params=params, segments=len(segments)))
    if errors:
        raise SpecError(errors)
    return items
