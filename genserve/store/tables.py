"""The whole schema in one place: every table of the job store, on SQLite and PostgreSQL alike.

The modules that read and write these tables (store/jobs.py, events/log.py, store/batches.py,
store/experiments.py, store/calibration.py, store/video_calibration.py, auth/keys.py,
workflows/records.py) import them from here, and `db.create_db_engine` creates them all, so a process
that opens the store always finds every table.
Times are stored as UTC and always come back as timezone-aware UTC datetimes.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Dialect


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp that goes in as any aware datetime and comes out as aware UTC.

    SQLite has no time zones, so it stores naive UTC; PostgreSQL stores `timestamptz`.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("request_id", sa.String(200), unique=True),
    sa.Column("request_hash", sa.String(128)),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, default=0),
    sa.Column("client_id", sa.String(200)),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("lease_owner", sa.String(200)),
    sa.Column("lease_until", UTCDateTime),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("error", sa.Text),
    sa.Column("image_ids", sa.JSON, nullable=False),
    # Scheduling: short or long queue, chosen at submit from the cost model's estimate.
    sa.Column("queue", sa.String(16), nullable=False, server_default="short"),
    sa.Column("estimated_seconds", sa.Float),
    # The request's trace (W3C trace id), so worker logs and spans join the API's trace.
    sa.Column("trace_id", sa.String(32)),
    # Retries of engine failures (batch items): a failed attempt goes back to the queue, not
    # before `not_before`, until max_attempts. Interactive jobs fail at once (retry_on_error null).
    sa.Column("retry_on_error", sa.Boolean),
    sa.Column("not_before", UTCDateTime),
    # What the job makes: "image" (GenerationParams), "video" (VideoParams) or "segment" (one
    # segment of a long video, a VideoSegment; parent_id names the video job it belongs to).
    sa.Column("kind", sa.String(16), nullable=False, server_default="image"),
    sa.Column("parent_id", sa.String(32)),
    sa.Column("segment_index", sa.Integer),
    # The claim order, so picking the next job is an index scan.
    sa.Index("ix_jobs_queue", "state", sa.desc("priority"), "created_at", "id"),
    sa.Index("ix_jobs_lease", "state", "lease_until"),
    sa.Index("ix_jobs_lease_owner", "lease_owner"),
    sa.Index("ix_jobs_created", "created_at", "id"),
    sa.Index("ix_jobs_client", "client_id", "created_at"),
    sa.Index("ix_jobs_parent", "parent_id", "segment_index"),
    # The scheduler's (queue, client) groups (JobStore.queued_jobs): covers "which groups have work"
    # and serves "a group's first jobs in queue order" without a sort.
    sa.Index(
        "ix_jobs_groups", "state", "queue", "client_id", sa.desc("priority"), "created_at", "id", "not_before"
    ),
)

# The primary key (job_id, seq) is both the uniqueness guarantee and the read index.
job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("job_id", sa.String(32), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("models_loaded", sa.JSON, nullable=False),
    sa.Column("last_seen", UTCDateTime, nullable=False),
)


# Server-side batches: a named list of item jobs.
batches = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("client_id", sa.String(200)),
    sa.Column("created_at", UTCDateTime, nullable=False),
)


batch_items = sa.Table(
    "batch_items",
    metadata,
    sa.Column("batch_id", sa.String(32), primary_key=True),
    sa.Column("item_index", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("item_key", sa.String(64), nullable=False),
    sa.Column("job_id", sa.String(32), nullable=False, index=True),
)


# A/B experiments: for each (variant, seed), the batch item job that renders it.
experiments = sa.Table(
    "experiments",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("client_id", sa.String(200)),
    sa.Column("created_at", UTCDateTime, nullable=False),
)


experiment_cells = sa.Table(
    "experiment_cells",
    metadata,
    sa.Column("experiment_id", sa.String(32), primary_key=True),
    sa.Column("variant_index", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seed_index", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("item_key", sa.String(64), nullable=False),
    sa.Column("job_id", sa.String(32), nullable=False, index=True),
)


# Step timings for the cost model: `genserve calibrate` writes them, serving refines them.
step_timings = sa.Table(
    "step_timings",
    metadata,
    sa.Column("device", sa.String(200), primary_key=True),
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("width", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("height", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("batch", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("overhead_s", sa.Float, nullable=False),
    sa.Column("step_s", sa.Float, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("samples", sa.Integer, nullable=False),
    sa.Column("observations", sa.Integer, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)


# Video cost model speed per (device, model): measured / predicted seconds per denoising step, where
# the prediction is engine/video/plan.py's (published H100-class figures). store/video_calibration.py.
video_timings = sa.Table(
    "video_timings",
    metadata,
    sa.Column("device", sa.String(200), primary_key=True),
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("scale", sa.Float, nullable=False),
    sa.Column("samples", sa.Integer, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)


# API keys and their limits.
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(12), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("salt", sa.String(32), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("revoked_at", UTCDateTime),
    # Limits; None means the server default (rate) or no limit (the rest).
    sa.Column("rate_per_second", sa.Float),
    sa.Column("rate_burst", sa.Integer),
    sa.Column("images_per_day", sa.Integer),
    sa.Column("gpu_seconds_per_day", sa.Float),
    sa.Column("allowed_models", sa.JSON),
    sa.Column("allowed_controls", sa.JSON),
    sa.Column("allowed_loras", sa.JSON),
    sa.Column("max_width", sa.Integer),
    sa.Column("max_height", sa.Integer),
)


# ComfyUI workflows: the prompts (for /history, /queue and resuming) and the uploaded files.
workflow_prompts = sa.Table(
    "workflow_prompts",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("client_id", sa.String(200)),
    sa.Column("owner", sa.String(200)),  # the API key's id with auth on
    sa.Column("prompt", sa.JSON, nullable=False),
    sa.Column("extra", sa.JSON, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # queued | running | success | error
    sa.Column("outputs", sa.JSON, nullable=False),
    sa.Column("messages", sa.JSON, nullable=False),
    sa.Column("error", sa.JSON),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime),
    sa.Index("ix_workflow_prompts_state", "state", "number"),
    sa.Index("ix_workflow_prompts_created", "created_at"),
)

workflow_files = sa.Table(
    "workflow_files",
    metadata,
    sa.Column("owner", sa.String(200), primary_key=True),  # "" with auth off
    sa.Column("name", sa.String(400), primary_key=True),  # "subfolder/filename" as LoadImage names it
    sa.Column("ref", sa.String(80), nullable=False),  # sha256:<hex> in the input store
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)
