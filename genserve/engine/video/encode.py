"""Turning a clip into a file: mp4/webm through PyAV's bundled FFmpeg, GIF/WebP through Pillow.

A clip is a numpy uint8 array (F, H, W, 3), RGB. Nothing here imports torch, so the API can import
`VIDEO_FORMATS` and `CODECS` to validate a request.

- H.264, AV1 and VP9 are written as yuv420p tagged BT.709 (limited range), which is what browsers
  expect; the RGB→YUV conversion uses the BT.709 matrix so the tag tells the truth.
- yuv420p needs even sizes: an odd width or height gets one more column or row, copied from the edge
  (nothing of the picture is lost; the file is at most one pixel larger).
- mp4 is written with `movflags=+faststart` (the `moov` index first) so a browser can start playing
  before the whole file has arrived.
- GIF and animated WebP go through Pillow: FFmpeg 8.1 cannot decode animated WebP back, and its GIF
  encoder needs a palette filter graph. Both loop forever. GIF frames share one palette; GIF stores
  frame durations in hundredths of a second (24 fps plays at 25), and Pillow merges identical
  consecutive GIF frames into one longer frame.
- NVENC (`h264_nvenc`) is used only when asked for (`prefer_nvenc=True`) and a probe opens it. H100,
  H200 and A100 have no NVENC hardware, so on those hosts the probe fails and libx264 is used; in
  Docker, NVENC also needs `NVIDIA_DRIVER_CAPABILITIES` to include `video`.

The PyAV binary wheel bundles x264/x265, which makes the wheel GPL in effect (see
research/video.md §5.1); the code here only calls it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import PIL.Image


@dataclass(frozen=True)
class CodecSpec:
    """One codec a request may name: the FFmpeg encoder, its quality scale and encoder options."""

    encoder: str
    default_crf: int | None  # None: the codec has no crf (GIF, WebP)
    max_crf: int | None
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class VideoFormat:
    """One output container: which codecs it takes and how it is served."""

    codecs: tuple[str, ...]
    default_codec: str
    mime: str
    extension: str


# veryfast: 3.6x the speed of medium at a small size cost (research/video.md §5.2); SVT-AV1 preset 8
# and VP9 cpu-used 5 are the comparable speed points.
CODECS: dict[str, CodecSpec] = {
    "h264": CodecSpec("libx264", 19, 51, (("preset", "veryfast"),)),
    "av1": CodecSpec("libsvtav1", 30, 63, (("preset", "8"),)),
    "vp9": CodecSpec(
        "libvpx-vp9", 32, 63, (("b", "0"), ("deadline", "good"), ("cpu-used", "5"), ("row-mt", "1"))
    ),
    "gif": CodecSpec("pillow-gif", None, None),
    "webp": CodecSpec("pillow-webp", None, None),
}

VIDEO_FORMATS: dict[str, VideoFormat] = {
    "mp4": VideoFormat(("h264", "av1"), "h264", "video/mp4", "mp4"),
    "webm": VideoFormat(("vp9", "av1"), "vp9", "video/webm", "webm"),
    "gif": VideoFormat(("gif",), "gif", "image/gif", "gif"),
    "webp": VideoFormat(("webp",), "webp", "image/webp", "webp"),
}

WEBP_QUALITY = 80


@dataclass(frozen=True)
class EncodedVideo:
    data: bytes
    mime: str
    extension: str
    container: str
    codec: str
    encoder: str  # the encoder that actually ran: libx264, h264_nvenc, libsvtav1, pillow-gif, ...
    width: int
    height: int
    frames: int
    fps: float


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    width: int
    height: int
    codec: str  # h264, av1, vp9, gif, webp
    container: str  # mp4, webm, gif, webp


def resolve_format(
    container: str, codec: str | None = None, crf: int | None = None
) -> tuple[str, int | None]:
    """The codec and crf a request gets, or a ValueError naming what is wrong (the API's validation)."""
    fmt = VIDEO_FORMATS.get(container)
    if fmt is None:
        raise ValueError(f"unknown container {container!r}; one of {sorted(VIDEO_FORMATS)}")
    codec = codec or fmt.default_codec
    if codec not in fmt.codecs:
        raise ValueError(f"container {container!r} takes codecs {list(fmt.codecs)}, not {codec!r}")
    spec = CODECS[codec]
    if crf is None:
        return codec, spec.default_crf
    if spec.max_crf is None:
        raise ValueError(f"codec {codec!r} has no crf")
    if not 0 <= crf <= spec.max_crf:
        raise ValueError(f"crf for {codec!r} must be in 0..{spec.max_crf}, not {crf}")
    return codec, crf


def encode_clip(
    frames: np.ndarray,
    fps: float,
    container: str = "mp4",
    codec: str | None = None,
    crf: int | None = None,
    *,
    prefer_nvenc: bool = False,
) -> EncodedVideo:
    """Encode a clip to bytes; the result says which encoder ran and the size written."""
    _check_clip(frames)
    if not fps > 0:
        raise ValueError(f"fps must be positive, not {fps}")
    codec, crf = resolve_format(container, codec, crf)
    fmt = VIDEO_FORMATS[container]
    if codec in ("gif", "webp"):
        data = _encode_pillow(frames, fps, codec)
        encoder, (h, w) = CODECS[codec].encoder, frames.shape[1:3]
    else:
        frames = pad_even(frames)
        h, w = frames.shape[1:3]
        encoder, data = CODECS[codec].encoder, None
        if codec == "h264" and prefer_nvenc and nvenc_available():
            data = _encode_nvenc(frames, fps, container, crf)
            encoder = "h264_nvenc" if data is not None else encoder
        if data is None:
            data = _encode_av(frames, fps, container, codec, encoder, crf)
    return EncodedVideo(data, fmt.mime, fmt.extension, container, codec, encoder, w, h, len(frames), fps)


def pad_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes: repeat the last row/column where one is odd."""
    h, w = frames.shape[1:3]
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _check_clip(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"a clip is uint8 (F, H, W, 3); got {frames.dtype} {frames.shape}")
    if len(frames) == 0:
        raise ValueError("a clip needs at least one frame")


def _frame_rate(fps: float) -> Fraction:
    # 1001 keeps NTSC rates exact (24000/1001 passed as a float comes back as 24000/1001)
    return Fraction(fps).limit_denominator(1001)


def _encode_nvenc(frames: np.ndarray, fps: float, container: str, crf: int | None) -> bytes | None:
    """NVENC, or None where it refuses this clip (it has a minimum size, about 145x49) so x264 takes over."""
    import av

    try:
        return _encode_av(frames, fps, container, "h264", "h264_nvenc", crf)
    except av.FFmpegError:
        return None


def _encode_av(
    frames: np.ndarray, fps: float, container: str, codec: str, encoder: str, crf: int | None
) -> bytes:
    # A real file, not BytesIO: faststart rewrites the mp4 by reopening its path, which BytesIO lacks
    with tempfile.TemporaryDirectory(prefix="genserve-encode-") as tmp, _scheduling_kept():
        path = Path(tmp) / f"clip.{container}"
        _mux(frames, fps, container, codec, encoder, crf, path)
        return path.read_bytes()


@contextlib.contextmanager
def _scheduling_kept() -> Iterator[None]:
    """Put back the calling thread's scheduling policy after an encode.

    Run as root, SVT-AV1 leaves the thread that opened it at SCHED_FIFO priority 99 (seen in
    tests/test_video_media.py's av1 cases); a worker left real-time, and every process it starts,
    starves the rest of a small machine (the test suite hung that way until this)."""
    policy = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None
    param = os.sched_getparam(0) if policy is not None else None
    try:
        yield
    finally:
        if policy is not None and os.sched_getscheduler(0) != policy:
            os.sched_setscheduler(0, policy, param)


def _mux(
    frames: np.ndarray, fps: float, container: str, codec: str, encoder: str, crf: int | None, path: Path
) -> None:
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its banner to stderr on every encode otherwise
    import av
    from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

    options = {"movflags": "+faststart"} if container == "mp4" else {}
    with av.open(str(path), "w", format=container, options=options) as out:
        stream = out.add_stream(encoder, rate=_frame_rate(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        ctx = stream.codec_context
        ctx.color_range, ctx.colorspace = ColorRange.MPEG, Colorspace.ITU709
        ctx.color_primaries, ctx.color_trc = ColorPrimaries.BT709, ColorTrc.BT709
        if encoder == "h264_nvenc":  # constant quality: NVENC's cq plays the part of crf
            ctx.options = {"preset": "p4", "rc": "vbr", "cq": str(crf)}
        else:
            ctx.options = {**dict(CODECS[codec].options), "crf": str(crf)}
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                format="yuv420p",
                dst_colorspace=Colorspace.ITU709,
                dst_color_range=ColorRange.MPEG,
                dst_color_primaries=ColorPrimaries.BT709,
                dst_color_trc=ColorTrc.BT709,
            )
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def _encode_pillow(frames: np.ndarray, fps: float, codec: str) -> bytes:
    buf = io.BytesIO()
    duration = 1000 / fps  # ms; GIF rounds it to 10 ms steps
    if codec == "gif":
        images = gif_frames(frames)
        images[0].save(buf, "GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    else:
        images = [PIL.Image.fromarray(f) for f in frames]
        images[0].save(
            buf,
            "WEBP",
            save_all=True,
            append_images=images[1:],
            duration=round(duration),
            loop=0,
            quality=WEBP_QUALITY,
        )
    return buf.getvalue()


def gif_frames(frames: np.ndarray, sample: int = 8) -> list[PIL.Image.Image]:
    """Palette frames sharing one 256-colour palette (median cut over `sample` evenly spaced frames),
    without dithering. Against Pillow's palette per frame, this is ~35x faster (64 frames at 256²:
    0.15 s, not 5.7 s), a third of the size (unchanged pixels stay unchanged, so GIF's frame deltas
    work) and does not shimmer; colours only in unsampled frames map to their nearest neighbours."""
    picks = np.linspace(0, len(frames) - 1, min(sample, len(frames))).round().astype(int)
    mosaic = PIL.Image.fromarray(np.concatenate([frames[i] for i in picks], axis=1))
    palette = mosaic.quantize(256, method=PIL.Image.Quantize.MEDIANCUT)
    return [PIL.Image.fromarray(f).quantize(palette=palette, dither=PIL.Image.Dither.NONE) for f in frames]


@functools.cache
def nvenc_available() -> bool:
    """Whether `h264_nvenc` opens here (probed once per process). False without an NVIDIA driver, in
    Docker without the `video` driver capability, and on GPUs without NVENC (H100, H200, A100)."""
    try:
        import av

        ctx = av.codec.CodecContext.create("h264_nvenc", "w")
        ctx.width, ctx.height, ctx.pix_fmt = 256, 256, "yuv420p"
        ctx.time_base = Fraction(1, 24)
        ctx.open()
        ctx.encode(
            av.VideoFrame.from_ndarray(np.zeros((256, 256, 3), np.uint8), format="rgb24").reformat(
                format="yuv420p"
            )
        )
        ctx.encode(None)
    except Exception:  # any failure (no codec, no driver, no hardware) means no NVENC
        return False
    return True


def probe_video(data: bytes) -> VideoInfo:
    """Decode a file back and count what is in it (for tests and the job finisher)."""
    if data[:6] in (b"GIF87a", b"GIF89a") or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return _probe_pillow(data)
    import av

    with av.open(io.BytesIO(data), "r") as src:
        stream = src.streams.video[0]
        frames = sum(1 for _ in src.decode(stream))
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        container = (
            "mp4" if "mp4" in src.format.name else "webm" if "webm" in src.format.name else src.format.name
        )
        codec = {"libdav1d": "av1", "libvpx-vp9": "vp9"}.get(
            stream.codec_context.name, stream.codec_context.name
        )
        return VideoInfo(frames, float(rate), stream.width, stream.height, codec, container)


def _probe_pillow(data: bytes) -> VideoInfo:
    with PIL.Image.open(io.BytesIO(data)) as im:
        kind = im.format.lower()
        frames = getattr(im, "n_frames", 1)
        durations = []
        for i in range(frames):
            im.seek(i)
            im.load()  # WebP sets a frame's duration only when it is decoded
            durations.append(im.info.get("duration", 0))
        mean_ms = sum(durations) / len(durations)
        return VideoInfo(
            frames, round(1000 / mean_ms, 3) if mean_ms else 0.0, im.width, im.height, kind, kind
        )


def first_frame_png(frames: np.ndarray, max_side: int | None = None) -> bytes:
    """The first frame as PNG (a thumbnail or a poster image), optionally shrunk to `max_side`."""
    _check_clip(frames)
    image = PIL.Image.fromarray(frames[0])
    if max_side:
        image.thumbnail((max_side, max_side), PIL.Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def filmstrip(frames: np.ndarray, max_frames: int = 8, height: int = 64) -> PIL.Image.Image:
    """Up to `max_frames` evenly spaced frames side by side at `height` px: a few KB that show the
    motion, for latent previews and thumbnails."""
    _check_clip(frames)
    count = min(max_frames, len(frames))
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    h, w = frames.shape[1:3]
    width = max(1, round(w * height / h))
    strip = PIL.Image.new("RGB", (width * count, height))
    for i, index in enumerate(picks):
        tile = PIL.Image.fromarray(frames[index]).resize((width, height), PIL.Image.Resampling.BILINEAR)
        strip.paste(tile, (i * width, 0))
    return strip
