"""The video cost model's speed on a device, measured: `genserve calibrate --video` writes it, serving
refines it. Torch-free (the API reads it).

engine/video/plan.py predicts seconds per denoising step from the latent tokens (frames × latent
size), fitted to published H100-class figures. One row per (device, model) in `video_timings`
(store/tables.py) holds scale = measured / predicted seconds per step: a "calibrated" row from
`genserve calibrate --video`, refined by every finished video job's steady-state step time (the
image rule, `cost.clipped_average`: an exponential moving average, each observation clipped to
within a factor MAX_JUMP); a job on a device and model with no row starts an "observed" one. An estimate
multiplies the published prediction by the stored scale when there is one (`speed`), else by
the setting video_speed_scale.
"""

from __future__ import annotations

import math
from collections import Counter

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from genserve.scheduler.cost import CALIBRATED, MEASURED_SOURCES
from genserve.scheduler.video_cost import VideoSpeed, VideoTiming, refine_scale
from genserve.store.db import create_db_engine, db_now, write_transaction
from genserve.store.tables import video_timings


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
            return VideoSpeed.published(video_speed_scale)
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
