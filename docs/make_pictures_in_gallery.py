"""Draw docs/pictures-in.png: img2img, inpainting, outpainting and hires fix on genserve-shapes.

    .venv/bin/python docs/make_pictures_in_gallery.py

Each row is an input picture and what the shipped model made of it with the prompt written under it,
through the same Engine the workers run (seed 0, 20 steps). The same cases, over 8 seeds and judged by
the model's classifier, are tests: tests/test_img2img_shapes.py, test_inpaint_shapes.py,
test_hires_shapes.py.
"""

from __future__ import annotations

from pathlib import Path

import PIL.Image
import PIL.ImageDraw

from genserve.engine.engine import Engine
from genserve.engine.models.registry import BUILTIN_MODELS_DIR, read_model_info
from genserve.schemas.generation import GenerationParams
from genserve.toymodel import dataset

OUT = Path(__file__).with_name("pictures-in.png")
HASH = "sha256:" + "0" * 64  # the engine is handed the picture itself; the id only names it
SCALE = 3  # 64 px pictures drawn at 192 px, without smoothing


def square_mask(size: int, box: tuple[int, int, int, int]) -> PIL.Image.Image:
    mask = PIL.Image.new("L", (size, size), 0)
    PIL.ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def main() -> None:
    info = read_model_info(BUILTIN_MODELS_DIR / "genserve-shapes")
    engine = Engine({info.name: info}, device="cpu", dtype="float32")
    base = {"model": info.name, "seed": 0, "steps": 20}
    red_circle = dataset.draw_scene(dataset.Scene("circle", "red", "blue", "top left", "large"), 64)
    plain = dataset.draw_scene(dataset.Scene("square", "white", "black", "center", "small"), 64)
    plain_mask = square_mask(64, (12, 12, 51, 51))
    cases = [
        (
            "img2img 0.6",
            red_circle,
            GenerationParams(
                prompt="a green circle on a blue background", init_image=HASH, strength=0.6, **base
            ),
            None,
        ),
        (
            "inpaint (mask: square)",
            plain,
            GenerationParams(
                prompt="a yellow star", init_image=HASH, mask=HASH, strength=0.75, width=64, height=64, **base
            ),
            plain_mask,
        ),
        (
            "outpaint right 32",
            red_circle,
            GenerationParams(
                prompt="a red circle on a blue background",
                init_image=HASH,
                outpaint={"right": 32},
                strength=0.75,
                **base,
            ),
            None,
        ),
        (
            "hires x2",
            None,
            GenerationParams(
                prompt="a red circle on a blue background", width=64, height=64, hires={"scale": 2}, **base
            ),
            None,
        ),
    ]
    rows = []
    for label, picture, params, mask in cases:
        resolved = params
        if picture is not None and params.width is None:
            width = picture.width + (params.outpaint.left + params.outpaint.right if params.outpaint else 0)
            resolved = params.model_copy(update={"width": width, "height": picture.height})
        [image] = engine.generate(resolved, init_image=picture, mask=mask)
        rows.append((label, picture, mask, image, params.prompt))

    cell = 64 * SCALE
    gap = 12
    width = 3 * gap + cell + max(row[3].width for row in rows) * SCALE  # the outpainted picture is widest
    height = len(rows) * (cell + 40) + gap
    sheet = PIL.Image.new("RGB", (width, height), "white")
    draw = PIL.ImageDraw.Draw(sheet)
    for index, (label, picture, mask, image, prompt) in enumerate(rows):
        top = gap + index * (cell + 40)
        if picture is not None:
            shown = picture.convert("RGB")
            if mask is not None:  # the masked area tinted, as the web UI's painter shows it
                tint = PIL.Image.new("RGB", shown.size, (255, 0, 255))
                shown = PIL.Image.composite(PIL.Image.blend(shown, tint, 0.5), shown, mask)
            sheet.paste(shown.resize((cell, cell), PIL.Image.NEAREST), (gap, top))
        else:
            draw.text((gap + 8, top + cell // 2), "(text only)", fill="black")
        scale = cell / 64
        result = image.resize((round(image.width * scale), round(image.height * scale)), PIL.Image.NEAREST)
        if result.height > cell:  # hires: shown at the same height, its real size in the label
            result = image.resize((cell, cell), PIL.Image.LANCZOS)
        sheet.paste(result, (gap + cell + gap, top))
        caption = f'{label}: "{prompt}" -> {image.width}x{image.height}'
        draw.text((gap, top + cell + 6), caption, fill="black")
    sheet.save(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
