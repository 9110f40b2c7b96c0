"""Durable workflow state in the job store's database: prompts (for /history, /queue and resuming
after a restart) and the names of pictures uploaded through `POST /upload/image`.

The node cache needs no table of its own: a stage's job is submitted under a request id derived
from the stage's key (runner.py), so the store's idempotency finds the finished job again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from genserve.store.db import db_now, write_transaction
from genserve.store.tables import workflow_files as files
from genserve.store.tables import workflow_prompts as prompts

ACTIVE = ("queued", "running")


@dataclass(frozen=True)
class PromptRecord:
    id: str
    number: int
    client_id: str | None
    owner: str | None
    prompt: dict[str, Any]
    extra: dict[str, Any]
    state: str
    outputs: dict[str, Any]
    messages: list[Any]
    error: dict[str, Any] | None
    created_at: datetime
    finished_at: datetime | None


class WorkflowRecords:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine  # opened by db.create_db_engine, which created the tables

    def add(
        self, prompt_id: str, prompt: dict, client_id: str | None, owner: str | None, extra: dict
    ) -> PromptRecord:
        with write_transaction(self.engine) as conn:
            number = (
                conn.execute(sa.select(sa.func.coalesce(sa.func.max(prompts.c.number), -1))).scalar_one() + 1
            )
            row = conn.execute(
                prompts.insert()
                .values(
                    id=prompt_id,
                    number=number,
                    client_id=client_id,
                    owner=owner,
                    prompt=prompt,
                    extra=extra,
                    state="queued",
                    outputs={},
                    messages=[],
                    created_at=db_now(conn),
                )
                .returning(*prompts.c)
            ).one()
        return PromptRecord(**row._mapping)

    def get(self, prompt_id: str) -> PromptRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(prompts).where(prompts.c.id == prompt_id)).first()
        return PromptRecord(**row._mapping) if row else None

    def list(
        self, owner: str | None = None, states: tuple[str, ...] | None = None, limit: int = 200
    ) -> list[PromptRecord]:
        """Newest first (active ones: oldest first, as a queue)."""
        query = sa.select(prompts)
        if owner is not None:
            query = query.where(prompts.c.owner == owner)
        if states is not None:
            query = query.where(prompts.c.state.in_(states)).order_by(prompts.c.number)
        else:
            query = query.order_by(prompts.c.number.desc())
        with self.engine.connect() as conn:
            rows = conn.execute(query.limit(limit)).all()
        return [PromptRecord(**row._mapping) for row in rows]

    def update(self, prompt_id: str, **values: Any) -> None:
        with write_transaction(self.engine) as conn:
            if values.get("state") in ("success", "error"):
                values["finished_at"] = db_now(conn)
            conn.execute(prompts.update().where(prompts.c.id == prompt_id).values(**values))

    def delete(self, prompt_ids: list[str], owner: str | None = None) -> None:
        query = prompts.delete().where(prompts.c.id.in_(prompt_ids))
        if owner is not None:
            query = query.where(prompts.c.owner == owner)
        with write_transaction(self.engine) as conn:
            conn.execute(query)

    # -- uploaded pictures -----------------------------------------------------------------------

    def file(self, owner: str | None, name: str) -> tuple[str, tuple[int, int]] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(files).where(files.c.owner == (owner or ""), files.c.name == name)
            ).first()
        return (row.ref, (row.width, row.height)) if row else None

    def file_names(self, owner: str | None) -> list[str]:
        with self.engine.connect() as conn:
            names = conn.execute(sa.select(files.c.name).where(files.c.owner == (owner or ""))).scalars()
            return sorted(names)

    def put_file(self, owner: str | None, name: str, ref: str, size: tuple[int, int], overwrite: bool) -> str:
        """Record `name` for the picture `ref`; the name it got (ComfyUI's "name (1).png" when the
        name is taken by another picture and `overwrite` is off)."""
        stem, dot, extension = name.rpartition(".")
        if not dot:
            stem, extension = name, ""
        with write_transaction(self.engine) as conn:
            for counter in range(1000):
                candidate = name if counter == 0 else f"{stem} ({counter}){dot}{extension}"
                where = sa.and_(files.c.owner == (owner or ""), files.c.name == candidate)
                row = conn.execute(sa.select(files).where(where)).first()
                if row is not None and (row.ref == ref or overwrite):
                    conn.execute(files.update().where(where).values(ref=ref, width=size[0], height=size[1]))
                    return candidate
                if row is None:
                    conn.execute(
                        files.insert().values(
                            owner=owner or "", name=candidate, ref=ref, width=size[0], height=size[1],
                            created_at=db_now(conn),
                        )
                    )  # fmt: skip
                    return candidate
        raise ValueError(f"too many pictures named like '{name}'")
