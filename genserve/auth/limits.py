"""Per-key rate limits, daily quotas and model/size limits.

One API replica keeps its token buckets in memory (`RateLimiter`). Replicas behind a load balancer
share them in Redis (`RedisRateLimiter`, the broker's Redis in multi-node mode), so a key's rate
holds across replicas instead of multiplying by their number. The quotas are read from the shared
job store and hold across replicas either way.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import redis

from genserve.auth.keys import KeyStore, seconds_until_next_utc_day
from genserve.engine.stages.plan import target_size
from genserve.schemas import GenerationParams, LimitError

log = logging.getLogger(__name__)


class RateLimited(Exception):
    """Too many requests (429). `retry_after` is whole seconds until the request would pass."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class QuotaExceeded(RateLimited):
    """A daily quota is used up (429, Retry-After: until the next UTC day)."""


@dataclass
class TokenBucket:
    """`burst` tokens at most, refilled at `rate` per second; each request takes one."""

    rate: float
    burst: int
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimiter:
    """One token bucket per key id, created on the key's first request."""

    def __init__(self, clock: object = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def check(self, key_id: str, rate: float | None, burst: int) -> None:
        """Take a token for `key_id` or raise RateLimited; rate None means unlimited."""
        if rate is None:
            return
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(key_id)
            if bucket is None or (bucket.rate, bucket.burst) != (rate, burst):
                bucket = self._buckets[key_id] = TokenBucket(rate, burst, float(burst), now)
            wait = bucket.take(now)
        _refuse_if_waiting(wait, rate, burst)


def _refuse_if_waiting(wait: float, rate: float, burst: int) -> None:
    if wait > 0:
        raise RateLimited(
            f"rate limit of {rate:g} requests/s (burst {burst}) exceeded for this API key",
            retry_after=max(1, math.ceil(wait)),
        )


# TokenBucket.take as one atomic script, on the Redis server's clock (replicas' clocks may differ).
# A bucket whose rate or burst changed starts full, as in RateLimiter. Returns the wait as a string
# (Redis would truncate a Lua number to an integer).
_TAKE = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated', 'rate', 'burst')
local tokens, updated = tonumber(state[1]), tonumber(state[2])
if tokens == nil or state[3] ~= ARGV[1] or state[4] ~= ARGV[2] then
  tokens, updated = burst, now
end
tokens = math.min(burst, tokens + (now - updated) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now), 'rate', ARGV[1], 'burst', ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""


class RedisRateLimiter:
    """`RateLimiter` with the buckets in Redis, shared by every API replica.

    When Redis cannot be reached the request passes (and a warning is logged): a rate limit guards
    the service's capacity, and refusing every request would be the outage it guards against. The
    daily quotas, read from the job store, still hold.
    """

    def __init__(self, redis_url: str, prefix: str = "genserve:ratelimit:") -> None:
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.prefix = prefix
        self._take = self.redis.register_script(_TAKE)

    def check(self, key_id: str, rate: float | None, burst: int) -> None:
        """Take a token for `key_id` or raise RateLimited; rate None means unlimited."""
        if rate is None:
            return
        try:
            wait = float(self._take(keys=[self.prefix + key_id], args=[repr(float(rate)), str(burst)]))
        except redis.RedisError:
            log.warning(
                "rate limit check failed (Redis unreachable); letting the request through", exc_info=True
            )
            return
        _refuse_if_waiting(wait, rate, burst)


def check_allowed_controls(params: GenerationParams, allowed: list[str] | None) -> None:
    """The key may use every control model the request names (422 naming the field)."""
    if allowed is None:
        return
    named = [(f"controlnets[{i}].model", unit.model) for i, unit in enumerate(params.controlnets or [])]
    if params.ip_adapter is not None:
        named.append(("ip_adapter.model", params.ip_adapter.model))
    for field, name in named:
        if name not in allowed:
            raise LimitError(field, f"this API key may use only the control models {allowed}, not '{name}'")


def check_key_limits(
    params: GenerationParams,
    allowed_models: list[str] | None,
    max_size: tuple,
    size_multiple: int = 8,
    allowed_loras: list[str] | None = None,
) -> None:
    """The key's own model and resolution limits on resolved params, the refiner and the hires pass's
    size included; LimitError (422) names the field. `size_multiple`: the family's hires rounding."""
    if allowed_models is not None and params.model not in allowed_models:
        raise LimitError(
            "model", f"this API key may use only the models {allowed_models}, not '{params.model}'"
        )
    if (
        allowed_models is not None
        and params.refiner is not None
        and params.refiner.model not in allowed_models
    ):
        raise LimitError(
            "refiner", f"this API key may use only the models {allowed_models}, not '{params.refiner.model}'"
        )
    for i, ref in enumerate(params.loras or []):
        if allowed_loras is not None and ref.name not in allowed_loras:
            raise LimitError(
                f"loras[{i}].name", f"this API key may use only the LoRAs {allowed_loras}, not '{ref.name}'"
            )
    max_width, max_height = max_size
    if max_width is not None and (params.width or 0) > max_width:
        raise LimitError("width", f"width {params.width} exceeds this API key's maximum width {max_width}")
    if max_height is not None and (params.height or 0) > max_height:
        raise LimitError(
            "height", f"height {params.height} exceeds this API key's maximum height {max_height}"
        )
    if params.hires is not None and params.width and params.height:
        width, height = target_size(params.width, params.height, params.hires, size_multiple)
        if (max_width is not None and width > max_width) or (max_height is not None and height > max_height):
            raise LimitError(
                "hires",
                f"the hires pass's {width}x{height} exceeds this API key's maximum size {max_width}x{max_height}",
            )


def check_quota(
    keys: KeyStore,
    key_id: str,
    images: int,
    seconds: float,
    images_per_day: int | None,
    gpu_seconds_per_day: float | None,
) -> None:
    """Raise QuotaExceeded when this request would take the key past a daily quota."""
    if images_per_day is None and gpu_seconds_per_day is None:
        return
    used = keys.usage(key_id)
    if images_per_day is not None and used.images + images > images_per_day:
        raise QuotaExceeded(
            f"daily image quota exhausted: {used.images} of {images_per_day} images used today (UTC); "
            f"this request asks for {images}",
            retry_after=seconds_until_next_utc_day(),
        )
    if gpu_seconds_per_day is not None and used.gpu_seconds + seconds > gpu_seconds_per_day:
        raise QuotaExceeded(
            f"daily GPU-seconds quota exhausted: {used.gpu_seconds:.1f} of {gpu_seconds_per_day:g} s used "
            f"today (UTC); this request needs about {seconds:.1f} s",
            retry_after=seconds_until_next_utc_day(),
        )
