"""From a spec to items: prompts × variants × n, each one image with a content-derived key.

An item's key is a hash of everything that decides its pixels (model, prompt, negative prompt, size,
steps, CFG, sampler, seed). Items with the same key are the same picture: within a spec they are
rendered once, and across specs the job store's idempotency makes them one job.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import string
from dataclasses import dataclass
from pathlib import Path

from genserve.api.submission import resolve_params
from genserve.batch.spec import BatchSpec, PromptFile, PromptItem, PromptTemplate, SpecError, parse_size
from genserve.config import Settings
from genserve.engine.registry import ModelInfo
from genserve.schemas import GenerationParams, LimitError

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


def item_key(params: GenerationParams) -> str:
    canonical = json.dumps({name: getattr(params, name) for name in KEY_FIELDS}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def read_prompts(spec: BatchSpec, base_dir: Path) -> list[tuple[str, str | None]]:
    """(prompt, negative prompt or None for the spec's default), in order."""
    source = spec.prompts
    if isinstance(source, PromptTemplate):
        return _fill_template(source)
    if isinstance(source, PromptFile):
        return _read_prompt_file(base_dir / source.file, source.file)
    return [
        (entry, None) if isinstance(entry, str) else (entry.prompt, entry.negative_prompt) for entry in source
    ]


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


def _read_prompt_file(path: Path, shown: str) -> list[tuple[str, str | None]]:
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
            prompts.append((entry.prompt, entry.negative_prompt))
        else:
            prompts.append((line.strip(), None))
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
    spec: BatchSpec, base_dir: Path, models: dict[str, ModelInfo], settings: Settings
) -> list[RenderItem]:
    """All items of the spec, checked against the same limits as the API; duplicates dropped."""
    prompts = read_prompts(spec, base_dir)
    rows = variant_rows(spec)
    items: list[RenderItem] = []
    seen: set[str] = set()
    errors: list[str] = []
    for (p, (prompt, negative)), (v, row) in itertools.product(enumerate(prompts), enumerate(rows)):
        for k in range(spec.variants.n):
            width, height = parse_size(row["size"]) if row["size"] else (None, None)
            try:
                params = resolve_params(
                    GenerationParams(
                        prompt=prompt,
                        negative_prompt=negative if negative is not None else spec.negative_prompt,
                        model=row["model"],
                        seed=row["seed"] + k,
                        steps=row["steps"],
                        cfg_scale=row["cfg_scale"],
                        width=width,
                        height=height,
                        sampler=row["sampler"],
                        num_images=1,
                        preview_every=0,  # nobody watches previews of a batch
                    ),
                    models,
                    settings,
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
