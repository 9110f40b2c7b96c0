"""Who is calling: the `Principal` dependency, the per-key submit path, and the app wiring (CORS).

With auth off every request is the anonymous principal (role admin, no limits), which is how
genserve behaves on 127.0.0.1 by default. With auth on, `Authorization: Bearer gs_...` is required
(HTTP Basic with the key as the password works too, for AUTOMATIC1111 clients' --api-auth).

The web UI also keeps its key in the `genserve_key` cookie (SameSite=Strict), because the browser
fetches images and event streams itself and cannot add a header to those. The cookie counts for
GET and HEAD only: a request that changes something must carry the header, which another site's
page cannot make a browser send, so the cookie opens no door to cross-site request forgery.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from genserve import tracing
from genserve.api.deps import Services
from genserve.api.pictures import store_pictures
from genserve.api.submission import estimated_seconds, resolve_params, submit
from genserve.auth.keys import KeyLimits, KeyStore, Role
from genserve.auth.limits import (
    RateLimited,
    RateLimiter,
    RedisRateLimiter,
    check_allowed_controls,
    check_key_limits,
    check_quota,
)
from genserve.batch.expand import RenderItem
from genserve.batch.runner import request_id_for
from genserve.config import Settings
from genserve.engine.stages.plan import size_multiple
from genserve.schemas import GenerationParams, JobCreate, LimitError
from genserve.schemas.generation import batch_key
from genserve.schemas.video import VideoParams
from genserve.store.jobs import JobRecord

# The request_id column holds 200 characters; a key's request ids are stored as "<key id>:<id>".
_MAX_REQUEST_ID = 200 - 13


@dataclass(frozen=True)
class Principal:
    """The caller. `key_id` is None when auth is off (everyone is the same, unrestricted caller)."""

    key_id: str | None
    role: Role
    name: str | None = None
    limits: KeyLimits = field(default_factory=KeyLimits)

    @property
    def authenticated(self) -> bool:
        return self.key_id is not None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def client_id(self, header: str | None) -> str | None:
        """The identity fair share rotates on: the key when there is one, else the X-Client-Id header."""
        return self.key_id if self.authenticated else header

    def owns(self, job: JobRecord) -> bool:
        return not self.authenticated or job.client_id == self.key_id

    def scoped_request_id(self, request_id: str | None) -> str | None:
        """Idempotency keys are per API key, so one key can neither find nor block another's."""
        if request_id is None or not self.authenticated:
            return request_id
        if len(request_id) > _MAX_REQUEST_ID:
            raise LimitError("request_id", f"request_id must be at most {_MAX_REQUEST_ID} characters")
        return f"{self.key_id}:{request_id}"

    def public_request_id(self, stored: str | None) -> str | None:
        prefix = f"{self.key_id}:"
        if stored is not None and self.authenticated and stored.startswith(prefix):
            return stored[len(prefix) :]
        return stored


ANONYMOUS = Principal(key_id=None, role="admin")


@dataclass
class AuthState:
    enabled: bool
    keys: KeyStore
    limiter: RateLimiter | RedisRateLimiter
    default_rate: float | None
    default_burst: int


# The cookie the web UI sets beside its Authorization header (see the module docstring).
KEY_COOKIE = "genserve_key"


def _token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or None
    if request.scope.get("method", "GET") in ("GET", "HEAD"):  # a websocket handshake is a GET
        return request.cookies.get(KEY_COOKIE) or None
    return None


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def get_principal(request: Request) -> Principal:
    """Authenticate the request and take a token from its key's rate-limit bucket."""
    cached = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    auth: AuthState = request.app.state.auth
    if not auth.enabled:
        principal = ANONYMOUS
    else:
        token = _token(request)
        if token is None:
            raise _unauthorized("an API key is required: send 'Authorization: Bearer gs_...'")
        key = auth.keys.verify(token)
        if key is None:
            raise _unauthorized("invalid or revoked API key")
        principal = Principal(key_id=key.id, role=key.role, name=key.name, limits=key.limits)
        rate = key.limits.rate_per_second if key.limits.rate_per_second is not None else auth.default_rate
        auth.limiter.check(key.id, rate, key.limits.rate_burst or auth.default_burst)
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise HTTPException(403, "this endpoint needs an admin API key")
    return principal


def submit_as(
    principal: Principal,
    body: JobCreate,
    services: Services,
    client_header: str | None = None,
    trace_id: str | None = None,
) -> tuple[JobRecord, bool]:
    """`submit` for this caller: the key's model and size limits, its quotas, its identity."""
    models = services.catalog.models()
    settings = services.settings
    body = store_pictures(body, services.inputs, settings.limits)  # from here on, pictures are ids
    if principal.authenticated:
        body = body.model_copy(update={"request_id": principal.scoped_request_id(body.request_id)})
        generation = GenerationParams.model_validate(
            body.model_dump(exclude={"request_id", "priority"}, exclude_unset=True)
        )
        resolved = resolve_params(generation, models, settings, services.inputs)
        limits = principal.limits
        multiple = size_multiple(models[resolved.model].family)
        check_key_limits(
            resolved,
            limits.allowed_models,
            (limits.max_width, limits.max_height),
            multiple,
            allowed_loras=limits.allowed_loras,
        )
        check_allowed_controls(resolved, limits.allowed_controls)
        if _has_quota(principal):
            seconds = estimated_seconds(resolved, models[resolved.model].family, services.store)
            _check_quota(principal, services, resolved.num_images, seconds)
    job, created = submit(
        body, models, settings, services.store, principal.client_id(client_header), trace_id, services.inputs
    )
    if created:
        tracing.job_submitted(job.id, job.trace_id)
    return job, created


def admit_batch(principal: Principal, items: list[RenderItem], services: Services) -> None:
    """A key's model and size limits for every item of a batch, and its daily quotas for the items
    it has not submitted before (a resubmitted spec only adds what is new). Nothing without auth."""
    if not principal.authenticated:
        return
    limits = principal.limits
    groups: dict[tuple, list[RenderItem]] = {}
    for item in items:
        groups.setdefault(batch_key(item.params), []).append(item)
    for group in groups.values():  # the key covers model, size and the LoRA set
        check_key_limits(
            group[0].params,
            limits.allowed_models,
            (limits.max_width, limits.max_height),
            allowed_loras=limits.allowed_loras,
        )
        for item in group:
            check_allowed_controls(item.params, limits.allowed_controls)
    if not _has_quota(principal):
        return
    request_ids = {item.key: request_id_for(item, principal.key_id) for item in items}
    known = services.store.known_request_ids(list(request_ids.values()))
    models = services.catalog.models()
    images, seconds = 0, 0.0
    for group in groups.values():
        new = [item for item in group if request_ids[item.key] not in known]
        if new:
            params = group[0].params
            images += sum(item.params.num_images for item in new)
            seconds += len(new) * estimated_seconds(params, models[params.model].family, services.store)
    _check_quota(principal, services, images, seconds)


def check_video_key_limits(
    principal: Principal, services: Services, params: VideoParams, seconds: float
) -> None:
    """A key's model and size limits, and its GPU-seconds quota, for a resolved video request."""
    limits = principal.limits
    if limits.allowed_models is not None and params.model not in limits.allowed_models:
        raise LimitError(
            "model", f"this API key may use only the models {limits.allowed_models}, not '{params.model}'"
        )
    for name, value, most in (
        ("width", params.width, limits.max_width),
        ("height", params.height, limits.max_height),
    ):
        if most is not None and (value or 0) > most:
            raise LimitError(name, f"{name} {value} exceeds this API key's maximum {name} {most}")
    if _has_quota(principal):
        _check_quota(principal, services, 0, seconds)


def _has_quota(principal: Principal) -> bool:
    return principal.limits.images_per_day is not None or principal.limits.gpu_seconds_per_day is not None


def _check_quota(principal: Principal, services: Services, images: int, seconds: float) -> None:
    limits = principal.limits
    check_quota(
        KeyStore(services.store.engine), principal.key_id, images, seconds,
        limits.images_per_day, limits.gpu_seconds_per_day,
    )  # fmt: skip


def install_auth(app: FastAPI, settings: Settings, keys: KeyStore) -> None:
    """Keys, rate limits and CORS for this app; `get_principal` reads `app.state.auth`."""
    state = AuthState(
        enabled=settings.auth_enabled,
        keys=keys,
        # One replica: buckets in memory. Several (a broker configured): shared in its Redis.
        limiter=RedisRateLimiter(url) if (url := settings.rate_limit_redis_url) else RateLimiter(),
        default_rate=settings.default_rate_per_second,
        default_burst=settings.default_rate_burst,
    )
    app.state.auth = state

    @app.exception_handler(RateLimited)
    async def rate_limited(request: Request, error: RateLimited) -> JSONResponse:
        headers = {"Retry-After": str(error.retry_after)}
        return JSONResponse({"detail": error.message}, status_code=429, headers=headers)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials=False,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Idempotency-Key",
                "X-Client-Id",
                "Last-Event-ID",
                "traceparent",
            ],
            expose_headers=["X-Trace-Id", "X-Job-Id", "Location", "Retry-After"],
        )
