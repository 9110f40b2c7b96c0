"""Post-processing with FFmpeg's temporal filters, run in-process through PyAV's libavfilter.

Generated clips flicker more than they shake, so the two filters here work along time:
- `deflicker` evens out each frame's brightness against a moving average of its neighbours;
- `atadenoise` (adaptive temporal averaging) removes noise that changes from frame to frame.

Frames go through as planar RGB (`gbrp`, a lossless reordering of rgb24), so no YUV round trip
softens the colours. Both filters buffer a few frames; the graph is flushed at the end, so the
output has exactly as many frames as the input.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np


def deflicker(frames: np.ndarray, size: int = 5, mode: str = "am") -> np.ndarray:
    """Scale each frame's brightness towards the mean of a `size`-frame window (2..129);
    `mode` is FFmpeg's averaging: am (arithmetic), gm, hm, qm, cm, pm, median."""
    if not 2 <= size <= 129:
        raise ValueError(f"deflicker size must be in 2..129, not {size}")
    return apply_filter(frames, "deflicker", f"size={size}:mode={mode}")


def temporal_denoise(frames: np.ndarray, strength: float = 0.02) -> np.ndarray:
    """FFmpeg's `atadenoise`: averages each pixel with its neighbours in time while they stay within the
    thresholds. `strength` is threshold A (a jump between two frames, as a fraction of full scale,
    0..0.3); threshold B (the change summed along the window) is twice it, FFmpeg's default ratio."""
    if not 0 < strength <= 0.3:
        raise ValueError(f"denoise strength must be in (0, 0.3], not {strength}")
    a, b = f"{strength:g}", f"{2 * strength:g}"
    return apply_filter(frames, "atadenoise", ":".join(f"{p}a={a}:{p}b={b}" for p in range(3)))


def apply_filter(frames: np.ndarray, name: str, args: str = "") -> np.ndarray:
    """Run one libavfilter filter over a clip (uint8 (F, H, W, 3)) and return the same number of frames."""
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"a clip is uint8 (F, H, W, 3); got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    graph = av.filter.Graph()
    source = graph.add_buffer(width=width, height=height, format="rgb24", time_base=Fraction(1, 25))
    chain = [
        graph.add("format", "gbrp"),
        graph.add(name, args),
        graph.add("format", "rgb24"),
        graph.add("buffersink"),
    ]
    node = source
    for nxt in chain:
        node.link_to(nxt)
        node = nxt
    graph.configure()

    out: list[np.ndarray] = []
    for i, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = i, Fraction(1, 25)
        graph.push(frame)
        _drain(graph, out)
    graph.push(None)  # end of stream: the filter releases the frames it was holding
    _drain(graph, out)
    if len(out) != len(frames):
        raise RuntimeError(f"filter {name} returned {len(out)} frames for {len(frames)}")
    return np.stack(out)


def _drain(graph: object, out: list[np.ndarray]) -> None:
    import av

    while True:
        try:
            frame = graph.pull()
        except (av.error.BlockingIOError, av.error.EOFError):
            return
        out.append(frame.to_ndarray(format="rgb24"))
