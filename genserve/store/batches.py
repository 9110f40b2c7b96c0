"""Server-side batches: a batch is a named list of item jobs. Items are ordinary jobs (idempotent by
item key), so a batch's progress is the states of its jobs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import uuid4

import sqlalchemy as sa

from genserve.store.db import db_now, write_transaction
from genserve.store.tables import batch_items, batches


@dataclass(frozen=True)
class BatchRecord:
    id: str
    name: str
    spec: dict[str, Any]
    client_id: str | None
    created_at: datetime


class BatchStore:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def create(
        self, name: str, spec: dict[str, Any], items: list[tuple[str, str]], client_id: str | None
    ) -> str:
        """Record a batch and its (item key, job id) pairs, in order; returns the batch id."""
        batch_id = uuid4().hex
        with write_transaction(self.engine) as conn:
            conn.execute(
                batches.insert().values(
                    id=batch_id, name=name, spec=spec, client_id=client_id, created_at=db_now(conn)
                )
            )
            rows = [
                {"batch_id": batch_id, "item_index": index, "item_key": key, "job_id": job_id}
                for index, (key, job_id) in enumerate(items)
            ]
            for start in range(0, len(rows), 1000):
                conn.execute(batch_items.insert(), rows[start : start + 1000])
        return batch_id

    def get(self, batch_id: str) -> BatchRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(batches).where(batches.c.id == batch_id)).first()
        return BatchRecord(**row._mapping) if row else None

    def job_ids(self, batch_id: str) -> dict[str, str]:
        """Item key → job id, in item order."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(batch_items.c.item_key, batch_items.c.job_id)
                .where(batch_items.c.batch_id == batch_id)
                .order_by(batch_items.c.item_index)
            ).all()
        return {key: job_id for key, job_id in rows}
