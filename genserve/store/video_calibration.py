"""The video cost model's speed on a device, measured: `genserve calibrate --video` writes it, serving
refines it. Torch-free (the API reads it).

engine/video/plan.py predicts seconds per denoising step from the latent tokens (frames × latent
size), fitted to published H100-class figures. One row per (device, model) in `video_timings`
(store/tables.py) holds scale = measured / predicted seconds per step: a "calibrated" row from
`genserve calibrate --video`, refined by every finished video job's steady-state step time (the
image rule, `cost.refine`: an exponential moving average, each observation clipped to within a
factor MAX_JUMP); a job on a device and model with no row starts an "observed" one. An estimate
multiplies the published prediction by the stored scale when there is one (`speed`), else by
the setting video_speed_scale.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from genserve.scheduler.cost import CALIBRATED, EMA_ALPHA, MAX_JUMP, MEASURED_SOURCES, OBSERVED
from genserve.store.db import create_db_engine, db_now, write_transaction
from genserve.store.tables import video_timings

PUBLISHED_BASIS = (
    "step time from latent tokens fitted to published H100-class figures (engine/video/plan.py) "
    "× video_speed_scale {scale:g}"
)


@dataclass(frozen=True)
class VideoTiming:
    """How fast `model` runs on `device` relative to plan.py's published step times."""

    device: str
    model: str
    scale: float  # measured / predicted seconds per denoising step
    source: str  # "calibrated" | "observed"
    samples: int  # step times behind the figure: calibration steps, then one per observed job
    updated_at: datetime | None = None


@dataclass(frozen=True)
class VideoSpeed:
    """The factor an estimate multiplies plan.py's prediction by, and why."""

    scale: float
    basis: str
    device: str | None  # the calibrated device, None for the published figures
    calibrated: bool


def steady_step_seconds(intervals: Sequence[float]) -> float | None:
    """The median of the step intervals after the first (which carries warm-up); None with fewer
    than two of those."""
    steady = [seconds for seconds in intervals[1:] if seconds > 0]
    return statistics.median(steady) if len(steady) >= 2 else None


def refine_scale(
    previous: VideoTiming | None,
    observed_scale: float,
    *,
    device: str,
    model: str,
    samples: int = 1,
    alpha: float = EMA_ALPHA,
) -> VideoTiming:
    """Fold one observed scale into a stored one: scale ← scale + alpha × (clip(observed) − scale),
    the observation clipped to within a factor MAX_JUMP of scale (`cost.refine`'s rule). The source
    is kept (a calibrated row stays calibrated); without a previous row it starts an observed one."""
    if not (math.isfinite(observed_scale) and observed_scale > 0):
        raise ValueError(f"observed scale must be a positive number, got {observed_scale}")
    if previous is None:
        return VideoTiming(device, model, observed_scale, OBSERVED, samples)
    if (previous.device, previous.model) != (device, model):
        raise ValueError("refine_scale() got a previous timing for another (device, model)")
    clipped = min(max(observed_scale, previous.scale / MAX_JUMP), previous.scale * MAX_JUMP)
    scale = previous.scale + alpha * (clipped - previous.scale)
    return replace(previous, scale=scale, samples=previous.samples + samples, updated_at=None)


class VideoCalibrationStore:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str) -> VideoCalibrationStore:
        return cls(create_db_engine(url))

    def save(self, timing: VideoTiming) -> None:
        """Insert or replace the row for the timing's (device, model)."""
        if timing.source not in MEASURED_SOURCES:
            raise ValueError(f"only measured timings are stored, not '{timing.source}'")
        if not (math.isfinite(timing.scale) and timing.scale > 0):
            raise ValueError(f"scale must be a positive number, got {timing.scale}")
        with write_transaction(self.engine) as conn:
            _upsert(conn, timing)

    def get(self, device: str, model: str) -> VideoTiming | None:
        c = video_timings.c
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(video_timings).where(c.device == device, c.model == model)).first()
        return _timing(row) if row else None

    def all(self, *, device: str | None = None, model: str | None = None) -> list[VideoTiming]:
        """Every stored row (optionally of one device and/or model), most recently updated first."""
        query = sa.select(video_timings).order_by(
            video_timings.c.updated_at.desc(), *video_timings.primary_key
        )
        if device is not None:
            query = query.where(video_timings.c.device == device)
        if model is not None:
            query = query.where(video_timings.c.model == model)
        with self.engine.connect() as conn:
            return [_timing(row) for row in conn.execute(query)]

    def observe(self, device: str, model: str, observed_scale: float) -> VideoTiming:
        """Fold one finished job's measured / predicted step time into the row (`refine_scale`).
        Two workers observing one row at once on PostgreSQL serialize on the row lock."""
        c = video_timings.c
        with write_transaction(self.engine) as conn:
            row = conn.execute(
                sa.select(video_timings).where(c.device == device, c.model == model).with_for_update()
            ).first()
            timing = refine_scale(_timing(row) if row else None, observed_scale, device=device, model=model)
            _upsert(conn, timing)
        return timing

    def default_device(self, model: str) -> str | None:
        """The device to plan `model` for when none is named, as images choose theirs
        (`cost.default_device`, the device with the most measured rows): of the devices with a row
        for the model (else of all), the one with the most video rows; None when nothing is stored."""
        rows = self.all()
        counts = Counter(t.device for t in rows)
        candidates = sorted({t.device for t in rows if t.model == model} or set(counts))
        return max(candidates, key=counts.__getitem__) if candidates else None

    def speed(self, model: str, video_speed_scale: float, device: str | None = None) -> VideoSpeed:
        """The stored scale of (device, model) with its basis, or the published figures' one."""
        device = device or self.default_device(model)
        timing = self.get(device, model) if device else None
        if timing is None:
            return VideoSpeed(video_speed_scale, PUBLISHED_BASIS.format(scale=video_speed_scale), None, False)
        how = "genserve calibrate --video" if timing.source == CALIBRATED else "observed jobs only"
        basis = (
            f"calibrated on {device} for {model} ({how}, {timing.samples} samples): step time from "
            f"latent tokens, published H100-class figures × {timing.scale:.4g} measured"
        )
        return VideoSpeed(timing.scale, basis, device, True)


def _upsert(conn: sa.Connection, timing: VideoTiming) -> None:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    values = {"scale": timing.scale, "samples": timing.samples, "source": timing.source}
    values["updated_at"] = db_now(conn)
    insert = dialect.insert(video_timings).values(device=timing.device, model=timing.model, **values)
    conn.execute(insert.on_conflict_do_update(index_elements=list(video_timings.primary_key), set_=values))


def _timing(row: sa.Row) -> VideoTiming:
    m = row._mapping
    return VideoTiming(m["device"], m["model"], m["scale"], m["source"], m["samples"], m["updated_at"])
