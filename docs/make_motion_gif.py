"""Write docs/motion-clips.gif: clips from the built-in video model, side by side, with their prompts.

    .venv/bin/python docs/make_motion_gif.py

One clip per motion, 16 frames at 64x64 (shown at 2x), default settings, seed 0.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from genserve.toymodel.motion_eval import generate_clips

PROMPTS = (
    "a green star moving left on a black background",
    "a red circle moving right on a blue background",
    "a yellow square moving up on a gray background",
    "a white triangle moving down on a brown background",
    "an orange circle growing on a black background",
    "a pink star shrinking on a blue background",
    "a still blue square on a white background",
)
SCALE = 2
COLUMNS = 4
CAPTION_HEIGHT = 40
FPS = 8
OUT = Path(__file__).resolve().parent / "motion-clips.gif"


def main() -> None:
    clips = generate_clips(list(PROMPTS), [0] * len(PROMPTS))
    frames, side = clips[0].shape[0], clips[0].shape[1] * SCALE
    rows = -(-len(clips) // COLUMNS)
    cell_w, cell_h = side + 8, side + CAPTION_HEIGHT
    font = ImageFont.load_default()
    pictures = []
    for f in range(frames):
        sheet = Image.new("RGB", (COLUMNS * cell_w, rows * cell_h), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for i, (clip, prompt) in enumerate(zip(clips, PROMPTS, strict=True)):
            x, y = (i % COLUMNS) * cell_w + 4, (i // COLUMNS) * cell_h + 2
            frame = Image.fromarray(np.asarray(clip[f])).resize((side, side), Image.Resampling.NEAREST)
            sheet.paste(frame, (x, y))
            caption = prompt.removesuffix(" background")
            draw.multiline_text(
                (x, y + side + 2), "\n".join(textwrap.wrap(caption, 22)), fill=(0, 0, 0), font=font
            )
        pictures.append(sheet.quantize(colors=128, dither=Image.Dither.NONE))
    pictures[0].save(
        OUT, save_all=True, append_images=pictures[1:], duration=1000 // FPS, loop=0, optimize=True
    )
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
