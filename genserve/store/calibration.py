"""Stored step timings for the cost model: `genserve calibrate` writes them, serving refines them.

One row per (device, model, width, height, batch), in the `step_timings` table (store/tables.py).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from genserve.scheduler.cost import StepTiming, default_device, lookup, refine
from genserve.store.db import create_db_engine, db_now, write_transaction
from genserve.store.tables import step_timings

_KEY = ("device", "model", "width", "height", "batch")
_VALUES = ("overhead_s", "step_s", "source", "samples", "observations")


class CalibrationStore:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str) -> CalibrationStore:
        return cls(create_db_engine(url))

    def save(self, timing: StepTiming) -> None:
        """Insert or replace the row for the timing's (device, model, width, height, batch)."""
        if timing.source not in ("calibrated", "observed"):
            raise ValueError(f"only measured timings are stored, not '{timing.source}'")
        with write_transaction(self.engine) as conn:
            self._upsert(conn, timing)

    def get(self, device: str, model: str, width: int, height: int, batch: int) -> StepTiming | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(step_timings).where(*_key_filter(device, model, width, height, batch))
            ).first()
        return _timing(row) if row else None

    def all(self, *, device: str | None = None, model: str | None = None) -> list[StepTiming]:
        """Every stored timing (optionally of one device and/or model), most recently updated first."""
        query = sa.select(step_timings).order_by(step_timings.c.updated_at.desc(), *step_timings.primary_key)
        if device is not None:
            query = query.where(step_timings.c.device == device)
        if model is not None:
            query = query.where(step_timings.c.model == model)
        with self.engine.connect() as conn:
            return [_timing(row) for row in conn.execute(query)]

    def lookup(
        self, *, device: str, model: str, family: str, width: int, height: int, batch: int
    ) -> StepTiming:
        """`cost.lookup` over this device's and model's rows: measured, scaled, or the default."""
        rows = self.all(device=device, model=model)
        return lookup(
            rows, device=device, model=model, family=family, width=width, height=height, batch=batch
        )

    def default_device(self, model: str | None = None) -> str:
        """The device with the most rows for `model` (else any), or the H100 reference."""
        return default_device(self.all(), model)

    def observe(
        self,
        device: str,
        model: str,
        width: int,
        height: int,
        batch: int,
        step_s: float,
        overhead_s: float | None = None,
    ) -> StepTiming:
        """Fold one steady-state step time (and optionally the batch's observed O) into the row.

        `cost.refine`: an exponential moving average of t_step; O stays as calibrated. Returns the
        stored timing. Two workers observing the same row at once on PostgreSQL serialize on the
        row lock; when the row is new, one of two simultaneous first observations may be lost,
        which an average does not notice.
        """
        with write_transaction(self.engine) as conn:
            row = conn.execute(
                sa.select(step_timings)
                .where(*_key_filter(device, model, width, height, batch))
                .with_for_update()
            ).first()
            timing = refine(
                _timing(row) if row else None,
                step_s,
                device=device,
                model=model,
                width=width,
                height=height,
                batch=batch,
                observed_overhead_s=overhead_s,
            )
            self._upsert(conn, timing)
        return timing

    @staticmethod
    def _upsert(conn: sa.Connection, timing: StepTiming) -> None:
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        values = {name: getattr(timing, name) for name in _VALUES} | {"updated_at": db_now(conn)}
        key = {name: getattr(timing, name) for name in _KEY}
        upsert = dialect.insert(step_timings).values(**key, **values)
        conn.execute(upsert.on_conflict_do_update(index_elements=list(step_timings.primary_key), set_=values))


def _key_filter(device: str, model: str, width: int, height: int, batch: int) -> list[sa.ColumnElement[bool]]:
    c = step_timings.c
    return [c.device == device, c.model == model, c.width == width, c.height == height, c.batch == batch]


def _timing(row: sa.Row) -> StepTiming:
    return StepTiming(**{name: row._mapping[name] for name in (*_KEY, *_VALUES)})
