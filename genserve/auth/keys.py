"""API keys: generated once, shown once, stored hashed.

A key reads `gs_<id>_<secret>`. The id is public (it names the key in logs, the CLI and the jobs
table); the secret is 32 random bytes. The store keeps only HMAC-SHA256(salt, secret) with a random
per-key salt. A slow password hash (bcrypt, argon2) protects low-entropy passwords against guessing;
a 256-bit random secret cannot be guessed, so one fast HMAC per request is enough, and the salt
means two stores never share a hash. Verification looks the row up by id and compares in constant
time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa

from genserve.store.db import create_db_engine, db_now, write_transaction
from genserve.store.tables import api_keys, jobs

Role = Literal["user", "admin"]
ROLES: tuple[str, ...] = ("user", "admin")
PREFIX = "gs_"
_TOKEN = re.compile(r"gs_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")


@dataclass(frozen=True)
class KeyLimits:
    rate_per_second: float | None = None
    rate_burst: int | None = None
    images_per_day: int | None = None
    gpu_seconds_per_day: float | None = None
    allowed_models: list[str] | None = None
    max_width: int | None = None
    max_height: int | None = None
    allowed_controls: list[str] | None = None  # ControlNets, T2I-Adapters, IP-Adapters; None: all
    allowed_loras: list[str] | None = None  # LoRA names (GET /v1/loras); None: all


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None
    limits: KeyLimits

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class Usage:
    """Today's use (UTC day) by one key."""

    images: int
    gpu_seconds: float


def hash_secret(salt: str, secret: str) -> str:
    return hmac.new(bytes.fromhex(salt), secret.encode(), hashlib.sha256).hexdigest()


def parse_token(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    match = _TOKEN.fullmatch(token.strip())
    return (match.group(1), match.group(2)) if match else None


def utc_day_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _key(row: sa.Row) -> ApiKey:
    limits = KeyLimits(**{name: row._mapping[name] for name in KeyLimits.__dataclass_fields__})
    return ApiKey(row.id, row.name, row.role, row.created_at, row.revoked_at, limits)


class KeyStore:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str) -> KeyStore:
        return cls(create_db_engine(url))

    def create(self, name: str, role: Role = "user", limits: KeyLimits | None = None) -> tuple[ApiKey, str]:
        """A new key and its token. The token is not stored: this is the only time it exists."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
        values: dict[str, Any] = vars(limits or KeyLimits())
        with write_transaction(self.engine) as conn:
            row = conn.execute(
                api_keys.insert()
                .values(
                    id=key_id,
                    name=name,
                    role=role,
                    salt=salt,
                    secret_hash=hash_secret(salt, secret),
                    created_at=db_now(conn),
                    **values,
                )
                .returning(*api_keys.c)
            ).one()
        return _key(row), f"{PREFIX}{key_id}_{secret}"

    def get(self, key_id: str) -> ApiKey | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
        return _key(row) if row else None

    def list(self, include_revoked: bool = True) -> list[ApiKey]:
        query = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            return [_key(row) for row in conn.execute(query)]

    def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke at once (the next request with it gets 401). None when there is no such key."""
        with write_transaction(self.engine) as conn:
            conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=db_now(conn))
            )
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
        return _key(row) if row else None

    def verify(self, token: str) -> ApiKey | None:
        """The active key this token belongs to, or None (malformed, unknown, wrong secret, revoked)."""
        parsed = parse_token(token)
        if parsed is None:
            return None
        key_id, secret = parsed
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
        if row is None or not hmac.compare_digest(hash_secret(row.salt, secret), row.secret_hash):
            return None
        key = _key(row)
        return key if key.active else None

    def usage(self, key_id: str, now: datetime | None = None) -> Usage:
        """Images and GPU-seconds of the key's jobs created today (UTC).

        A job counts unless it was canceled before it started. Its GPU-seconds are its run time
        (finished_at - started_at) once finished, and the cost model's estimate reserved at submit
        while it is queued or running, so a burst of submissions cannot overshoot the quota.
        """
        day = utc_day_start(now or datetime.now(UTC))
        counted = sa.and_(
            jobs.c.client_id == key_id,
            jobs.c.created_at >= day,
            sa.not_(sa.and_(jobs.c.state == "canceled", jobs.c.started_at.is_(None))),
        )
        query = sa.select(
            jobs.c.params, jobs.c.started_at, jobs.c.finished_at, jobs.c.estimated_seconds
        ).where(counted)
        images, seconds = 0, 0.0
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                images += int(row.params.get("num_images", 1))
                if row.started_at is not None and row.finished_at is not None:
                    seconds += (row.finished_at - row.started_at).total_seconds()
                else:
                    seconds += row.estimated_seconds or 0.0
        return Usage(images=images, gpu_seconds=seconds)


def seconds_until_next_utc_day(now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    return max(1, int((utc_day_start(now) + timedelta(days=1) - now).total_seconds()) + 1)
