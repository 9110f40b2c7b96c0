"""The batch spec: N prompts × variants, read from YAML or JSON and checked up front.

    name: catalog
    prompts:                         # a list, {file: prompts.txt | prompts.jsonl}, or a template
      template: "a {size} {color} {shape} on a {background} background"
      values: {size: [small, large], color: [red, blue], shape: [circle, star], background: [black]}
    negative_prompt: ""
    variants:                        # grid (every combination) or zip (element-wise)
      mode: grid
      strength: [0.5, 0.75]          # img2img: items whose prompt has an init_image
      seed: [1, 2]
      size: ["64x64"]
      steps: [20]
      cfg_scale: [3.5]
      sampler: [euler]
      model: [genserve-shapes]
      n: 1                           # images per combination: seeds seed, seed+1, ...
    output: {dir: out/catalog, pattern: "{index:05d}-{seed}.{ext}", format: png}
    retries: 3

A prompt item may start from a picture: `{prompt: "a green circle", init_image: red.png}` (a file
next to the spec; base64, a data URL or an upload id when the spec is sent to /v1/batches).

A video batch renders every item as a clip (a video job, as POST /v1/video/jobs makes one):

    kind: video
    prompts: ["a red ball bounces", "a blue star spins"]
    video: {num_frames: 25, fps: 8, mode: t2v, post: {interpolate: 2}, output: {container: webm}}
    variants: {seed: [1, 2], size: ["512x320"], model: [genserve-shapes-motion]}

An image batch may upscale or restore faces on every image: `post: {upscale: {model:
genserve-shapes-2x, scale: 2}, face_restore: {model: GFPGANv1.4, visibility: 0.8}}`.

`video` applies to every item; `variants.steps` and `variants.cfg_scale` (the guidance) are the
model's defaults unless given, and sampler and strength do not apply. In mode i2v each prompt item's
`init_image` is its first frame. Files take the container's extension.

Every error names its place in the spec, e.g. `variants.size[1]: expected WIDTHxHEIGHT`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from genserve.schemas.generation import MAX_SEED, SamplerName
from genserve.schemas.upscale import ImagePost
from genserve.schemas.video import LongOptions, OutputOptions, PostOptions


class SpecError(ValueError):
    """A spec problem, with every error located: ["prompts[3]: ...", "variants.size[1]: ..."]."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class PromptFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str = Field(description="A text file (one prompt per line) or JSONL ({'prompt': ...} per line).")


class PromptTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    template: str = Field(description='Placeholders in braces, e.g. "a {color} {object}".')
    values: dict[str, list[str]] = Field(description="Every combination of the lists fills the template.")


class PromptItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    init_image: str | None = Field(
        None,
        description="Start from this picture: a file (relative to the spec) in a local spec; base64, a "
        "data URL or an upload id (sha256:<hex>) sent to /v1/batches.",
    )
    mask: str | None = Field(None, description="Inpaint where white; same forms as init_image.")


class Variants(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    mode: Literal["grid", "zip"] = "grid"
    seed: list[int] = Field(default_factory=lambda: [0])
    size: list[str] | None = Field(None, description='"WIDTHxHEIGHT"; the model\'s native size if omitted.')
    steps: list[int] = Field(default_factory=lambda: [20])
    cfg_scale: list[float | None] = Field(
        default_factory=lambda: [None], description="The model's default CFG scale if omitted."
    )
    sampler: list[SamplerName] = Field(default_factory=lambda: ["euler"])
    model: list[str | None] = Field(default_factory=lambda: [None])
    strength: list[float] = Field(
        default_factory=lambda: [0.75], description="img2img strengths (items with an init_image only)."
    )
    n: int = Field(1, ge=1, le=1000, description="Images per combination (seeds seed, seed+1, ...).")

    @field_validator("seed")
    @classmethod
    def _seeds_in_range(cls, seeds: list[int]) -> list[int]:
        for index, seed in enumerate(seeds):
            if not 0 <= seed <= MAX_SEED:
                raise ValueError(f"seed[{index}] = {seed} is outside 0..{MAX_SEED}")
        return seeds

    @field_validator("strength")
    @classmethod
    def _strengths_in_range(cls, strengths: list[float]) -> list[float]:
        for index, strength in enumerate(strengths):
            if not 0 < strength <= 1:
                raise ValueError(f"strength[{index}] = {strength} is outside (0, 1]")
        return strengths

    @field_validator("size")
    @classmethod
    def _sizes_parse(cls, sizes: list[str] | None) -> list[str] | None:
        for index, size in enumerate(sizes or []):
            parse_size(size, f"size[{index}]")
        return sizes


class Output(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dir: str = "batch-output"
    pattern: str = Field(
        "{index:05d}-{seed}.{ext}",
        description="Fields: index, key, seed, model, width, height, steps, cfg_scale, sampler, slug, ext.",
    )
    format: Literal["png", "jpeg", "webp"] = "png"


class VideoOptions(BaseModel):
    """What every item of a `kind: video` batch shares (VideoParams' fields of the same names)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["t2v", "i2v"] = Field(
        "t2v", description="t2v: from the prompt; i2v: from each prompt item's init_image."
    )
    num_frames: int | None = Field(None, ge=1, description="Frames per clip; the model's default if omitted.")
    seconds: float | None = Field(None, gt=0, description="Instead of num_frames: seconds at fps.")
    fps: int | None = Field(None, ge=1, le=120)
    long: LongOptions | None = None
    post: PostOptions = Field(default_factory=PostOptions)
    output: OutputOptions = Field(default_factory=OutputOptions)


def _prompt_kind(value: object) -> str:
    return "text" if isinstance(value, str) else "item"


def _prompts_kind(value: object) -> str:
    if isinstance(value, dict) or isinstance(value, BaseModel):
        return (
            "template"
            if "template" in (value if isinstance(value, dict) else value.model_fields_set)
            else "file"
        )
    return "list"


# Tagged unions, so an error names the one shape the value was meant to have, not every alternative.
PromptEntry = Annotated[
    Annotated[str, Field(min_length=1), Tag("text")] | Annotated[PromptItem, Tag("item")],
    Discriminator(_prompt_kind),
]
Prompts = Annotated[
    Annotated[list[PromptEntry], Field(min_length=1), Tag("list")]
    | Annotated[PromptFile, Tag("file")]
    | Annotated[PromptTemplate, Tag("template")],
    Discriminator(_prompts_kind),
]
_UNION_TAGS = {"list", "file", "template", "text", "item"}


class BatchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("batch", min_length=1, max_length=200)
    kind: Literal["image", "video"] = Field("image", description="Pictures, or video clips (see `video`).")
    prompts: Prompts
    negative_prompt: str = ""
    variants: Variants = Variants()
    output: Output = Output()
    retries: int = Field(3, ge=1, le=20, description="Attempts per item before it is recorded as failed.")
    priority: int = Field(-1, ge=-10, le=10)
    video: VideoOptions | None = Field(None, description="kind: video: the clip every item makes.")
    post: ImagePost | None = Field(None, description="kind: image: upscale / face_restore every image.")

    @model_validator(mode="after")
    def _video_goes_with_kind(self) -> BatchSpec:
        if self.video is not None and self.kind != "video":
            raise ValueError("video options need kind: video")
        if self.post is not None and self.kind != "image":
            raise ValueError("post (upscale, face_restore) is for kind: image; a video has video.post")
        if self.kind == "video" and self.video is None:
            self.video = VideoOptions()
        return self


def parse_size(size: str, where: str = "size") -> tuple[int, int]:
    try:
        width, height = (int(part) for part in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"{where}: expected WIDTHxHEIGHT, got {size!r}") from None
    return width, height


def locate(loc: tuple) -> str:
    """('variants', 'size', 1) -> 'variants.size[1]'."""
    text = ""
    for part in loc:
        if isinstance(part, str) and part in _UNION_TAGS:
            continue  # which alternative of a tagged union: not a place in the spec
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "spec"


def load_spec(source: str | Path | dict, base_dir: Path | None = None) -> tuple[BatchSpec, Path]:
    """Parse and validate a spec (a path to YAML/JSON, or a dict). Raises SpecError with locations.

    Returns the spec and the directory relative paths in it (prompt files, output dir) resolve against.
    """
    if isinstance(source, dict):
        data, base = source, base_dir or Path.cwd()
    else:
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as error:
            raise SpecError([f"{path}: cannot read the spec ({error.strerror})"]) from None
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            raise SpecError(
                [f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}"]
            ) from None
        base = base_dir or path.parent
    if not isinstance(data, dict):
        raise SpecError(["spec: expected a mapping with at least 'prompts'"])
    try:
        return BatchSpec.model_validate(data), base
    except ValidationError as error:
        raise SpecError(
            [f"{locate(e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in error.errors()]
        ) from None
