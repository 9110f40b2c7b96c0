"""Experiments: a spec and, for each (variant, seed), the batch item job that renders it. The jobs are
ordinary batch items (shared with batches and other experiments by item key), so an experiment's
progress is the states of its jobs and it survives a restart like they do."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import uuid4

import sqlalchemy as sa

from genserve.store.db import db_now, write_transaction
from genserve.store.tables import experiment_cells, experiments


@dataclass(frozen=True)
class ExperimentRecord:
    id: str
    name: str
    spec: dict[str, Any]
    client_id: str | None
    created_at: datetime


class ExperimentStore:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def create(
        self,
        name: str,
        spec: dict[str, Any],
        cells: dict[tuple[int, int], tuple[str, str]],
        client_id: str | None,
    ) -> str:
        """Record an experiment and its cells, (variant, seed index) → (item key, job id); returns its id."""
        experiment_id = uuid4().hex
        with write_transaction(self.engine) as conn:
            conn.execute(
                experiments.insert().values(
                    id=experiment_id, name=name, spec=spec, client_id=client_id, created_at=db_now(conn)
                )
            )
            rows = [
                {
                    "experiment_id": experiment_id,
                    "variant_index": v,
                    "seed_index": s,
                    "item_key": key,
                    "job_id": job,
                }
                for (v, s), (key, job) in sorted(cells.items())
            ]
            if rows:
                conn.execute(experiment_cells.insert(), rows)
        return experiment_id

    def get(self, experiment_id: str) -> ExperimentRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(experiments).where(experiments.c.id == experiment_id)).first()
        return ExperimentRecord(**row._mapping) if row else None

    def cells(self, experiment_id: str) -> dict[tuple[int, int], str]:
        """(variant index, seed index) → job id."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    experiment_cells.c.variant_index, experiment_cells.c.seed_index, experiment_cells.c.job_id
                ).where(experiment_cells.c.experiment_id == experiment_id)
            ).all()
        return {(v, s): job_id for v, s, job_id in rows}

    def list(self, client_id: str | None = None, limit: int = 50) -> list[ExperimentRecord]:
        """The newest experiments first (of one client when given)."""
        query = sa.select(experiments).order_by(experiments.c.created_at.desc()).limit(limit)
        if client_id is not None:
            query = query.where(experiments.c.client_id == client_id)
        with self.engine.connect() as conn:
            return [ExperimentRecord(**row._mapping) for row in conn.execute(query)]
