"""Running one video job on a worker: a clip in one pass, one segment of a long clip, or the
stitch of a long clip whose segments are done.

Phases of a clip: 1 keyframes in → 2 denoise (segment k of K, step i of S) → 3 stitch (long
clips) → 4 post (deflicker, denoise) → 5 interpolate (RIFE) → 6 encode → 7 measure and store.
Every phase writes an event with its stage, so a client following the video's events sees where
it is; segments write theirs to the video's log as well as their own. Like an image job, the job
ends in exactly one fenced store transition.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image

from genserve.artifacts.images import ImageStore
from genserve.artifacts.inputs import InputStore, open_picture
from genserve.artifacts.png import preview_data_url
from genserve.artifacts.videos import VideoStore
from genserve.config import Settings
from genserve.engine.models.controls import registered_controls
from genserve.engine.models.registry import ModelInfo
from genserve.engine.upscale.stage import PostStage
from genserve.engine.video.deliver import finish_clip, stitch_segments
from genserve.engine.video.encode import encode_clip, filmstrip, first_frame_png
from genserve.engine.video.pipelines import VideoEngine, VideoRequest
from genserve.engine.video.plan import output_seconds, predicted_step_seconds
from genserve.metrics import VIDEO_SECONDS_MADE, VIDEO_STAGE_SECONDS
from genserve.scheduler.calibrate import device_name
from genserve.scheduler.video_cost import steady_interval_seconds
from genserve.schemas.upscale import UpscaleOptions
from genserve.schemas.video import VideoParams, VideoSegment
from genserve.store.jobs import JobRecord, JobStore
from genserve.store.video_calibration import VideoCalibrationStore
from genserve.worker.lease import JobCanceled, LeaseKeeper, LeaseLost

log = logging.getLogger(__name__)


class VideoInputError(Exception):
    """A keyframe or input video cannot be loaded: the job fails with this reason."""


@dataclass
class VideoContext:
    """What a video job needs from its worker."""

    settings: Settings
    store: JobStore
    leases: LeaseKeeper
    inputs: InputStore
    images: ImageStore
    videos: VideoStore
    engine: VideoEngine
    worker_id: str
    upscalers: PostStage | None = None  # the image engine's upscalers, for post.upscale


class VideoJob:
    """One claimed video or segment job, run to its end."""

    def __init__(self, context: VideoContext, job: JobRecord, models: dict[str, ModelInfo]) -> None:
        self.context = context
        self.job = job
        self.models = models
        self.timings: dict[str, float] = {}
        segment = VideoSegment.model_validate(job.params) if job.kind == "segment" else None
        self.segment = segment
        self.params = segment.params if segment is not None else VideoParams.model_validate(job.params)
        # Where progress goes: the job's own log, and for a segment its video's too.
        self.logs = [job.id] + ([job.parent_id] if job.parent_id else [])
        self.step_intervals: list[float] = []  # seconds between step callbacks, for the cost model
        self._step_mark = 0.0

    # -- the job's one ending -----------------------------------------------------------------------

    def run(self) -> str:
        store, fence = self.context.store, (self.job.id, self.context.worker_id, self.job.attempt)
        self.context.leases.hold([(self.job.id, self.job.attempt)])
        try:
            outputs = self._make()
            self.context.leases.check(self.job.id)
            return "succeeded" if store.complete(*fence, outputs) else "lease_lost"
        except JobCanceled:
            store.mark_canceled(*fence)
            return "canceled"
        except LeaseLost:
            log.warning("lease lost; another attempt owns the video job", extra={"job_id": self.job.id})
            return "lease_lost"
        except VideoInputError as error:
            store.fail(*fence, str(error))
            return "failed"
        except Exception as error:  # out of memory, a bug: the job fails with the reason, the worker goes on
            log.exception("video job failed", extra={"job_id": self.job.id})
            store.fail(*fence, f"{type(error).__name__}: {error}")
            return "failed"
        finally:
            self.context.leases.drop([self.job.id])

    def _make(self) -> list[str]:
        if self.segment is not None:
            return self._make_segment(self.segment)
        parts = self.context.store.segments_of(self.job.id)
        if parts:
            frames, seams = self._stitch(parts)
        else:
            frames, seams = self._denoise(self._request(self.params)), []
        return self._deliver(frames, seams)

    # -- 1-2: keyframes in, denoise ----------------------------------------------------------------

    def _request(self, params: VideoParams, video: np.ndarray | None = None) -> VideoRequest:
        size = (params.width, params.height)
        keyframes = [(key.frame_index, self._picture(key.image, size)) for key in params.keyframes]
        if params.mode == "v2v" and video is None and params.video is not None:
            video = self._input_video(params.video, size)
        sparsectrl = None
        if params.sparsectrl is not None:  # AnimateDiff keyframes (checked when the job was submitted)
            sparsectrl = registered_controls(self.context.settings).get(params.sparsectrl.model)
            if sparsectrl is None or sparsectrl.kind != "sparsectrl":
                raise VideoInputError(f"SparseCtrl model {params.sparsectrl.model} is no longer registered")
        return VideoRequest(
            params=params,
            keyframes=keyframes,
            video=video,
            preview_every=params.preview_every or 0,
            sparsectrl=sparsectrl,
        )

    def _picture(self, ref: str, size: tuple[int | None, int | None]) -> PIL.Image.Image:
        try:
            picture = open_picture(self.context.inputs.get(ref)).convert("RGB")
        except Exception as error:
            raise VideoInputError(f"keyframe {ref} cannot be loaded: {error}") from None
        return picture.resize(size, PIL.Image.LANCZOS) if picture.size != size else picture

    def _input_video(self, ref: str, size: tuple[int | None, int | None]) -> np.ndarray:
        """An input clip: an animated GIF, WebP or PNG upload, frame by frame."""
        try:
            clip = PIL.Image.open(io.BytesIO(self.context.inputs.get(ref)))
            frames = []
            for index in range(getattr(clip, "n_frames", 1)):
                clip.seek(index)
                frames.append(np.asarray(clip.convert("RGB").resize(size, PIL.Image.LANCZOS)))
        except Exception as error:
            raise VideoInputError(f"video {ref} cannot be loaded: {error}") from None
        return np.stack(frames[: self.params.num_frames])

    def _denoise(self, request: VideoRequest) -> np.ndarray:
        info = self.models[request.params.model]
        base = self.models.get(info.base_model) if info.base_model else None
        started = time.perf_counter()
        self._event("stage", {"stage": "denoise", **self._where()})
        self.step_intervals, self._step_mark = [], time.perf_counter()
        frames = self.context.engine.generate(
            info, request, on_step=self._on_step, on_preview=self._on_preview, base=base
        )
        self._time("denoise", started)
        self._observe_speed(info, request.params)
        return frames

    def _observe_speed(self, info: ModelInfo, params: VideoParams) -> None:
        """Refine the video cost model's stored scale for this device and model with this clip's
        steady-state step time (store/video_calibration.py). Advisory: a failure only logs."""
        step_s = steady_interval_seconds(self.step_intervals)
        if step_s is None or not (params.num_frames and params.width and params.height):
            return
        predicted = predicted_step_seconds(info.family, params.num_frames, params.width, params.height)
        try:
            device = device_name(self.context.engine.device)
            VideoCalibrationStore(self.context.store.engine).observe(device, info.name, step_s / predicted)
        except Exception:
            log.warning("could not record a video step time", exc_info=True)

    def _where(self) -> dict:
        if self.segment is None:
            return {}
        return {"segment": self.segment.index, "segments": self.segment.count}

    def _on_step(self, step: int, steps: int) -> None:
        self.step_intervals.append(time.perf_counter() - self._step_mark)
        try:
            self._report_step(step, steps)
        finally:  # the next interval is the pipeline's alone: events and previews are left out
            self._step_mark = time.perf_counter()

    def _report_step(self, step: int, steps: int) -> None:
        self.context.leases.check(self.job.id)
        done = step / steps
        if self.segment is not None:  # the video's share: segments are equal parts
            done = (self.segment.index + done) / self.segment.count
        data = {
            "stage": "denoise",
            "step": step,
            "steps": steps,
            "percent": round(100 * done, 1),
            **self._where(),
        }
        self._event("progress", data)
        if step == steps:  # the pipeline decodes the latents next, inside the same call
            self._event("stage", {"stage": "decode", **self._where()})

    def _on_preview(self, step: int, steps: int, frames: np.ndarray) -> None:
        strip = filmstrip(frames, max_frames=8)
        self._event(
            "preview", {"step": step, "steps": steps, "filmstrip": preview_data_url(strip), **self._where()}
        )
        self._step_mark = time.perf_counter()

    def _event(self, type: str, data: dict) -> None:
        self.context.store.events.append_many([(log_id, type, data) for log_id in self.logs])

    def _time(self, stage: str, started: float) -> None:
        seconds = time.perf_counter() - started
        self.timings[stage] = round(self.timings.get(stage, 0.0) + seconds, 4)
        VIDEO_STAGE_SECONDS.labels(self.params.model or "", stage).observe(seconds)

    # -- a segment of a long clip -----------------------------------------------------------------

    def _make_segment(self, segment: VideoSegment) -> list[str]:
        params, video = segment.params, None
        if segment.continues:
            previous = self.context.store.segments_of(self.job.parent_id or "")[segment.index - 1]
            before = self.context.videos.load_frames(f"{previous.id}.npz")
            if params.mode == "i2v":  # image-to-video: start from the last frame
                last = PIL.Image.fromarray(before[-1])
                request = self._request(params)
                request.keyframes = [(0, last)]
            else:  # a clip condition: continue the last `overlap` frames
                video = before[-segment.overlap :]
                request = self._request(params, video)
        else:
            request = self._request(params)
        frames = self._denoise(request)
        videos = self.context.videos
        videos.save_frames(f"{self.job.id}.npz", frames)
        videos.save(f"{self.job.id}.mp4", encode_clip(frames, params.fps or 8, "mp4", "h264").data)
        url = f"/v1/video/files/{self.job.id}.mp4"
        self._event("segment_ready", {"segment": segment.index, "segments": segment.count, "url": url})
        return [f"{self.job.id}.npz", f"{self.job.id}.mp4"]

    def _stitch(self, parts: list[JobRecord]) -> tuple[np.ndarray, list[int]]:
        started = time.perf_counter()
        self._event("stage", {"stage": "stitch", "segments": len(parts)})
        clips = [self.context.videos.load_frames(f"{part.id}.npz") for part in parts]
        segments = [VideoSegment.model_validate(part.params) for part in parts]
        frames, seams = stitch_segments(clips, self.params, segments)
        self._time("stitch", started)
        return frames, seams

    # -- 4-7: post, interpolate, encode, measure, store --------------------------------------------

    def _deliver(self, frames: np.ndarray, seams: list[int]) -> list[str]:
        params = self.params
        thumbnail = self._thumbnail(frames)
        encoded, report = finish_clip(
            frames, seams, params,
            device=self.context.engine.device,
            prefer_nvenc=self.context.settings.video_nvenc,
            on_stage=lambda stage, data: self._event("stage", {"stage": stage, **data}),
            on_pairs=self._on_pairs,
            upscale_frame=self._upscaler(),
        )  # fmt: skip
        for stage, seconds in report["timings"].items():
            VIDEO_STAGE_SECONDS.labels(params.model or "", stage).observe(seconds)
        report["timings"] = {**self.timings, **report["timings"]}
        name = f"{self.job.id}.{params.output.container}"
        self.context.videos.save(name, encoded.data)
        self.context.videos.save_record(f"{self.job.id}.json", report)
        VIDEO_SECONDS_MADE.labels(params.model or "").inc(output_seconds(params))
        self._event(
            "video_ready",
            {"url": f"/v1/video/files/{name}", "frames": report["frames"], "fps": report["fps"]},
        )
        return [name, thumbnail]

    def _upscaler(self) -> Callable[[PIL.Image.Image], PIL.Image.Image] | None:
        name, stage = self.params.post.upscale, self.context.upscalers
        if name is None or stage is None:
            return None
        if not stage.knows(name):  # a file added after the worker started
            from genserve.engine.models.upscalers import scan_upscalers

            settings = self.context.settings
            stage.update(
                scan_upscalers(settings.models_dir, builtin=settings.builtin_models), stage.face_detector
            )
        info = stage.info(name, "upscaler")
        options = UpscaleOptions(model=name, scale=float(info.scale or 2))
        return lambda picture: stage.upscale(picture, options)

    def _on_pairs(self, done: int, total: int) -> None:
        self.context.leases.check(self.job.id)
        self._event(
            "progress",
            {"stage": "interpolate", "step": done, "steps": total, "percent": round(100 * done / total, 1)},
        )

    def _thumbnail(self, frames: np.ndarray) -> str:
        image_id = f"{self.job.id}-thumb"
        middle = len(frames) // 2
        self.context.images.save(image_id, first_frame_png(frames[middle : middle + 1]))
        return image_id


def run_video_job(context: VideoContext, job: JobRecord, models: dict[str, ModelInfo]) -> str:
    """Run a claimed video or segment job; returns its outcome."""
    return VideoJob(context, job, models).run()
