"""The experiment spec: variants × seeds, read from YAML or JSON (or a POST body) and checked up front.

    name: red-circle-wording
    base: {prompt: "a red circle on a white background", size: 64x64, steps: 8}
    variants:                         # the first is the baseline (A)
      - {name: A}
      - {name: B, prompt: "a blue square on a white background"}
      - {name: C, cfg_scale: 7.5}
    seeds: 5                          # or a list: [11, 12, 13]
    metrics: [mse, ssim, shape, colour, clip]
    reference_image: ref.png          # optional: MSE/SSIM against it (else against A, same seed)
    target: "a red circle on a white background"   # optional: what shape/colour/CLIP score against
    gpu_price_per_hour: 2.5           # optional: cost in money, not only GPU-seconds

Every image is a batch item (`batch.expand`): resolved and checked like a request, keyed by what
decides its pixels, submitted on the long queue with `batch.runner.submit_items`. A variant equal
to another (or to an image rendered before) is rendered once.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from genserve.api.pictures import check_picture, decode_payload, stored_size
from genserve.artifacts.inputs import InputStore
from genserve.batch.expand import RenderItem, expand
from genserve.batch.spec import BatchSpec, Output, PromptItem, SpecError, Variants, locate, parse_size
from genserve.config import Limits, Settings
from genserve.engine.models.registry import ModelInfo
from genserve.schemas import LimitError
from genserve.schemas.generation import MAX_SEED, SamplerName
from genserve.schemas.image_inputs import is_image_hash

# variants × seeds: an experiment is a comparison, not a catalogue (use a batch for that).
MAX_IMAGES = 400
MAX_VARIANTS = 26
MetricName = Literal["mse", "ssim", "shape", "colour", "clip"]
ALL_METRICS: tuple[str, ...] = MetricName.__args__  # type: ignore[attr-defined]


class ParamOverrides(BaseModel):
    """Generation parameters a variant may set; unset ones come from `base`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    prompt: str | None = Field(None, min_length=1)
    negative_prompt: str | None = None
    model: str | None = None
    size: str | None = Field(None, description='"WIDTHxHEIGHT"; the model\'s native size if omitted.')
    steps: int | None = Field(None, ge=1)
    cfg_scale: float | None = Field(None, description="The model's default CFG scale if omitted.")
    sampler: SamplerName | None = None

    @field_validator("size")
    @classmethod
    def _size_parses(cls, size: str | None) -> str | None:
        if size is not None:
            try:
                parse_size(size)
            except ValueError as error:
                raise ValueError(str(error).removeprefix("size: ")) from None
        return size


class Variant(ParamOverrides):
    name: str = Field(min_length=1, max_length=60)


class ExperimentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("experiment", min_length=1, max_length=200)
    base: ParamOverrides = Field(default_factory=ParamOverrides, description="What every variant shares.")
    variants: list[Variant] = Field(min_length=2, max_length=MAX_VARIANTS, description="The first is A.")
    seeds: list[int] | int = Field(
        5, description="Seeds every variant renders: a list, or a count N for seeds 0..N-1."
    )
    metrics: list[MetricName] = Field(default_factory=lambda: list(ALL_METRICS), min_length=1)
    reference_image: str | None = Field(
        None,
        description="MSE/SSIM against this picture (else against variant A's image of the same seed): a "
        "file next to a local spec; base64, a data URL or an upload id (sha256:<hex>) sent to the API.",
    )
    target: str | None = Field(
        None,
        min_length=1,
        description="What the images should show, for the shape, colour and CLIP scores; each "
        "variant's own prompt if omitted.",
    )
    gpu_price_per_hour: float | None = Field(None, ge=0, description="Price of one GPU-hour, for cost.")
    priority: int = Field(-1, ge=-10, le=10)
    retries: int = Field(3, ge=1, le=20)
    output: Output = Field(default_factory=lambda: Output(dir="experiment-output"))

    @field_validator("seeds")
    @classmethod
    def _seeds_valid(cls, seeds: list[int] | int) -> list[int] | int:
        if isinstance(seeds, int):
            if not 1 <= seeds <= MAX_IMAGES:
                raise ValueError(f"a seed count must be in 1..{MAX_IMAGES}, got {seeds}")
            return seeds
        if not seeds:
            raise ValueError("give at least one seed")
        for index, seed in enumerate(seeds):
            if not 0 <= seed <= MAX_SEED:
                raise ValueError(f"seeds[{index}] = {seed} is outside 0..{MAX_SEED}")
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds repeat; each seed is one pair of the paired test")
        return seeds

    @field_validator("variants")
    @classmethod
    def _names_unique(cls, variants: list[Variant]) -> list[Variant]:
        names = [variant.name for variant in variants]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise ValueError(f"variants[{index}].name: {name!r} is used twice")
        return variants

    @model_validator(mode="after")
    def _every_variant_has_a_prompt_and_the_count_fits(self) -> ExperimentSpec:
        if self.base.prompt is None:
            missing = [i for i, variant in enumerate(self.variants) if variant.prompt is None]
            if missing:
                raise ValueError(f"variants[{missing[0]}].prompt: no prompt here and none in base.prompt")
        images = len(self.variants) * len(self.seed_list)
        if images > MAX_IMAGES:
            raise ValueError(
                f"seeds: variants × seeds = {len(self.variants)} × {len(self.seed_list)} = {images} images; "
                f"the limit is {MAX_IMAGES}"
            )
        return self

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def resolved(self, index: int) -> ParamOverrides:
        """Variant `index`'s parameters: its own where set, else the base's."""
        variant = self.variants[index]
        own = variant.model_dump(exclude={"name"}, exclude_none=True)
        return ParamOverrides.model_validate({**self.base.model_dump(exclude_none=True), **own})


def load_experiment(source: str | Path | dict) -> tuple[ExperimentSpec, Path]:
    """Parse and validate a spec (a YAML/JSON file, or a dict). Raises SpecError naming each field;
    returns the spec and the folder its relative paths (reference image, output) resolve against."""
    if isinstance(source, dict):
        return experiment_from_data(source), Path.cwd()
    path = Path(source)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError([f"{path}: cannot read the spec ({error.strerror})"]) from None
    return experiment_from_data(parse_spec_text(text, str(path))), path.parent


def experiment_from_data(data: object) -> ExperimentSpec:
    """A parsed spec (from `parse_spec_text` or a JSON body) validated; SpecError naming each field."""
    if not isinstance(data, dict):
        raise SpecError(["spec: expected a mapping with at least 'variants'"])
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError([_located(e) for e in error.errors()]) from None


class _PlainLoader(yaml.SafeLoader):
    """YAML without aliases: `*name` could make a small text expand into a huge document."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases (*name) are not allowed in a spec")
        return super().compose_node(parent, index)


def parse_spec_text(text: str, where: str = "spec") -> object:
    """YAML or JSON text (JSON is YAML) as plain data; SpecError if it is neither, nests too deep,
    or holds NaN or infinity."""
    try:
        data = yaml.load(text, Loader=_PlainLoader)  # noqa: S506 - a SafeLoader, without aliases
    except yaml.YAMLError as error:
        raise SpecError([f"{where}: not valid YAML or JSON: {error}"]) from None
    except RecursionError:
        raise SpecError([f"{where}: nested too deeply"]) from None
    if _non_finite(data):
        raise SpecError([f"{where}: NaN and infinity are not numbers a spec can use"])
    return data


def _non_finite(value: object, depth: int = 0) -> bool:
    if depth > 64:
        raise SpecError(["spec: nested too deeply"])
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(item, depth + 1) for item in value.values())
    if isinstance(value, list):
        return any(_non_finite(item, depth + 1) for item in value)
    return False


def _located(error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")
    where = locate(error["loc"]) if error["loc"] else "spec"
    # A check that names a place inside its own ("variants[1].name: ...") keeps that place.
    if re.match(rf"^{re.escape('' if where == 'spec' else where)}[\w.\[\]]*: ", message):
        return message
    return f"{where}: {message}"


def store_reference(
    spec: ExperimentSpec, base_dir: Path, inputs: InputStore, limits: Limits, local_files: bool
) -> ExperimentSpec:
    """The spec with its reference image stored and named by hash (a file is read only from a local
    spec). Raises SpecError naming `reference_image`."""
    value = spec.reference_image
    if value is None:
        return spec
    field = "reference_image"
    try:
        if is_image_hash(value):
            stored_size(inputs, value, field)
            return spec
        if local_files and not value.startswith("data:") and (base_dir / value).is_file():
            value = base64.b64encode((base_dir / value).read_bytes()).decode("ascii")
        data = decode_payload(value, field, limits.max_upload_bytes)
        check_picture(data, field, limits)
    except LimitError as error:
        hint = " (or a file next to the spec)" if local_files else ""
        raise SpecError([f"{field}: {error.message.removeprefix(f'{field}: ')}{hint}"]) from None
    return spec.model_copy(update={"reference_image": inputs.put(data)})


@dataclass(frozen=True)
class ExperimentPlan:
    """What to render: the unique items, and for each (variant, seed index) the key of its item."""

    items: list[RenderItem]
    cells: dict[tuple[int, int], str]


def variant_batch_spec(spec: ExperimentSpec, index: int) -> BatchSpec:
    """Variant `index` as a batch spec of one prompt × the experiment's seeds."""
    params = spec.resolved(index)
    return BatchSpec(
        name=spec.name,
        prompts=[PromptItem(prompt=params.prompt or "", negative_prompt=params.negative_prompt)],
        variants=Variants(
            mode="grid",
            seed=spec.seed_list,
            size=[params.size] if params.size else None,
            steps=[params.steps] if params.steps else Variants().steps,
            cfg_scale=[params.cfg_scale],
            sampler=[params.sampler or "euler"],
            model=[params.model],
        ),
        priority=spec.priority,
        retries=spec.retries,
    )


def carrier_batch_spec(spec: ExperimentSpec) -> BatchSpec:
    """The batch spec that `submit_items` and the batch CLI's `run_local` read: name, priority,
    retries and output (every item's own parameters come from `plan`)."""
    prompts = [PromptItem(prompt=spec.resolved(i).prompt or "") for i in range(len(spec.variants))]
    return BatchSpec(
        name=spec.name, prompts=prompts, priority=spec.priority, retries=spec.retries, output=spec.output
    )


def plan(spec: ExperimentSpec, models: dict[str, ModelInfo], settings: Settings) -> ExperimentPlan:
    """Every variant × seed as a checked batch item; errors name the variant's field."""
    items: list[RenderItem] = []
    by_key: dict[str, RenderItem] = {}
    cells: dict[tuple[int, int], str] = {}
    errors: list[str] = []
    seeds = spec.seed_list
    for v in range(len(spec.variants)):
        try:
            rendered = expand(variant_batch_spec(spec, v), Path.cwd(), models, settings)
        except SpecError as error:
            errors.extend(_variant_error(line, v, seeds) for line in error.errors)
            continue
        for item in rendered:
            seed_index = seeds.index(item.params.seed)
            if item.key not in by_key:
                by_key[item.key] = RenderItem(index=len(items), key=item.key, params=item.params)
                items.append(by_key[item.key])
            cells[(v, seed_index)] = item.key
    if errors:
        raise SpecError(list(dict.fromkeys(errors)))
    return ExperimentPlan(items, cells)


_ITEM_PLACE = re.compile(r"^prompts\[0\] × variants\[(\d+)\] \(n=0\)\.?")


def _variant_error(line: str, variant: int, seeds: list[int]) -> str:
    """'prompts[0] × variants[2] (n=0).model: unknown' -> 'variants[1].model: unknown' (the batch's
    variants are this variant's seeds; a field error is the same for every seed, so it is named once)."""
    match = _ITEM_PLACE.match(line)
    if match is None:
        return f"variants[{variant}]: {line}"
    rest = line[match.end() :]
    if rest.startswith(": "):  # a pydantic error: ": width   Input should be a multiple of 8 [type=...]"
        field, _, message = rest[2:].partition(" ")
        message = re.sub(r"\s*\[type=.*$", "", message.strip())
    else:
        field, _, message = rest.partition(": ")
    field = {"width": "size", "height": "size"}.get(field, field)
    return f"variants[{variant}].{field}: {message}"
