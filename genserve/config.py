"""Settings: the only place that reads environment variables and defaults.

Every other module receives a `Settings` (or a piece of it) explicitly.
Environment variables use the `GENSERVE_` prefix; nested fields use `__`,
for example `GENSERVE_LIMITS__MAX_STEPS=50`.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Nothing may fetch weights from a hub at run time; set before diffusers/transformers import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1); False for 0.0.0.0 and the rest."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


class Limits(BaseModel):
    """Per-request limits. Every violation is answered with 422 naming the field and the limit."""

    max_width: int = Field(1024, ge=8)
    max_height: int = Field(1024, ge=8)
    max_pixels: int = Field(1024 * 1024, ge=64)
    max_steps: int = Field(100, ge=1)
    min_cfg_scale: float = 0.0
    max_cfg_scale: float = 30.0
    max_num_images: int = Field(4, ge=1)
    max_prompt_chars: int = Field(2000, ge=1)
    # Video: frames generated (before interpolation), over all of a long clip's segments.
    max_video_frames: int = Field(257, ge=1)
    # Any request body, JSON or multipart (api/input_guard.py): 413 above it, before it is read whole.
    # Room for a picture and a mask at max_upload_bytes each, base64-encoded (4/3 larger).
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # Input pictures (init_image, mask, uploads): bytes of one picture as sent, and its pixels.
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_input_pixels: int = Field(4096 * 4096, ge=64)
    # None allows every model found in the models directory.
    allowed_models: list[str] | None = None


class Optimizations(BaseModel):
    """Engine speed levers (docs/performance.md); None / "auto" = the device's default."""

    channels_last: bool | None = None
    fuse_qkv: bool | None = None
    sdpa_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    compile: Literal["auto", "off", "default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "auto"
    compile_vae: bool | None = None
    compile_backend: str = "inductor"
    compile_cache_dir: Path | None = None  # None: <data_dir>/compile-cache
    batch_buckets: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], min_length=1)
    warm_sizes: list[str] = Field(default_factory=list)  # "WxH" warmed besides the native size
    fp16_safe_vae: bool = True
    vae_tiling: Literal["auto", "on", "off"] = "auto"
    vae_tile_above_pixels: int = Field(1536 * 1536, ge=1)
    vae_tile_size: int = Field(1024, ge=64)
    vae_slicing: Literal["auto", "on", "off"] = "auto"
    vae_slice_above_pixels: int = Field(4 * 1024 * 1024, ge=1)
    deepcache: int = Field(0, ge=0)
    fp8: bool = False
    lora_hotswap_rank: int = Field(0, ge=0)  # >0: compiled single-LoRA hot-swap, LoRAs padded to it


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENSERVE_", env_nested_delimiter="__", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 7860
    data_dir: Path = Path("data")
    models_dir: Path = Path("models")
    # SQLAlchemy URL of the job store; None means SQLite at <data_dir>/genserve.db.
    store_url: str | None = None
    # The trained toy model shipped in the package (genserve/builtin_models/genserve-shapes).
    default_model: str = "genserve-shapes"
    # The video model a video request that names none gets: genserve-shapes' motion module.
    default_video_model: str = "genserve-shapes-motion"
    # Serve the models shipped with genserve besides those in models_dir (a models_dir entry of the
    # same name takes precedence).
    builtin_models: bool = True
    # With optimizations.lora_hotswap_rank: the LoRA loaded (at weight 0) into the hot-swap slot when a
    # model loads, so warm-up compiles the UNet with it and the first LoRA batch swaps, not compiles.
    lora_hotswap_preload: str | None = None

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | float16 | bfloat16 | float32
    warmup: bool = True
    # Prompts are user data: they reach the logs only when this is set.
    log_prompts: bool = False
    # Model cache budgets per worker in GiB, weights only (None: unbounded). On CUDA, vram bounds models
    # on the GPU and ram bounds models offloaded to CPU RAM; on a CPU, ram bounds the cache.
    vram_budget_gib: float | None = Field(None, gt=0)
    ram_budget_gib: float | None = Field(None, gt=0)
    offload_to_cpu: bool = True
    # torch CPU threads in each worker (None: torch's default, one per core).
    torch_threads: int | None = Field(None, ge=1)

    # Worker processes started and supervised by `genserve serve` (0: API only).
    workers: int = 1
    # A claimed job belongs to its worker until lease expiry; the worker renews while it runs.
    lease_seconds: float = Field(30.0, gt=0)
    # How often a running job checks for cancellation and renews its lease.
    heartbeat_seconds: float = Field(0.1, gt=0)
    # How often an idle worker looks for queued work.
    poll_seconds: float = Field(0.2, gt=0)
    max_attempts: int = Field(3, ge=1)
    # First retry delay of jobs that retry engine failures (batch items); doubles per attempt.
    retry_backoff_seconds: float = Field(2.0, ge=0)

    # Default preview cadence in steps when a request does not say (0 disables previews).
    preview_every: int = Field(2, ge=0)

    # Scheduling. A job whose estimated time exceeds the threshold goes to the long queue; while both
    # queues hold work the long queue gets `long_queue_share` of the batches.
    long_queue_threshold_seconds: float = Field(30.0, gt=0)
    # Video cost estimates are in seconds of an H100-class GPU (engine/video/plan.py); this is the
    # serving device's time for the same work relative to that (a CPU: hundreds).
    video_speed_scale: float = Field(1.0, gt=0)
    # Encode H.264 with NVENC where it opens (probed once); H100, H200 and A100 have no NVENC.
    video_nvenc: bool = True
    long_queue_share: float = Field(0.25, ge=0, le=1)
    # Batch limits in images: keys "model@WxH", "model", "*@WxH" or "*" (JSON in the environment).
    # Without one, the worker estimates from free GPU memory, or uses the default below on CPU.
    batch_limits: dict[str, int] = {}
    default_max_batch_images: int = Field(8, ge=1)
    # Store a batch's images and end its jobs on a second thread while the next batch runs, so the
    # GPU does not wait for PNG encoding and store writes (None: on with a GPU). Off on a CPU: there
    # the finishing competes with the next batch for the same cores (benchmarks/batch_idle_gap.py).
    background_finish: bool | None = None
    # Claim the next batch on a helper thread while the current one runs its last step, so the
    # device does not wait for the queue listing and the claim between batches (None: on with a
    # GPU). Off on a CPU, for the same reason as background_finish (benchmarks/batching_throughput.py
    # with GENSERVE_PREFETCH_BATCHES=true/false).
    prefetch_batches: bool | None = None

    # GENSERVE_OPTIMIZATIONS__COMPILE=off, GENSERVE_OPTIMIZATIONS__BATCH_BUCKETS='[1,4]', ...
    optimizations: Optimizations = Optimizations()

    limits: Limits = Limits()

    # Access control (docs/api-compat.md). auto: API keys are required when `host` is not a loopback
    # address. Serving open (no keys) on a non-loopback address also needs allow_open_public.
    auth: Literal["auto", "on", "off"] = "auto"
    allow_open_public: bool = False
    # Origins allowed to call the API from a browser (CORS); empty: no CORS headers.
    cors_origins: list[str] = []
    # A new key's defaults: token-bucket rate (requests per second) and burst; None means unlimited.
    default_rate_per_second: float | None = Field(10.0, gt=0)
    default_rate_burst: int = Field(20, ge=1)
    # OpenTelemetry: spans are exported over OTLP/HTTP to this endpoint; None: no exporter.
    otlp_endpoint: str | None = None
    # API key ids reach the logs only when this is set; a key's secret never does.
    log_keys: bool = False
    # How long the synchronous compatibility endpoints (OpenAI, AUTOMATIC1111) wait for their job.
    compat_timeout_seconds: float = Field(600.0, gt=0)

    # Multi-node mode (docs/scaling.md). A broker URL (redis://...) makes API replicas stateless: no
    # supervised workers; `genserve worker` processes take jobs woken through Celery.
    broker_url: str | None = None
    broker_queue: str = "genserve"
    # Above the longest job: a message redelivers only after this; the lease reaper recovers faster.
    visibility_timeout_seconds: float = Field(3600.0, gt=0)
    # Spot pools: on SIGTERM a running job still unfinished after this many seconds goes back to the
    # queue (below the grace the node gives: 10 on GKE spot, 100 on AWS spot). None: warm shutdown.
    spot_shutdown_seconds: float | None = Field(None, ge=0)
    # Progress events go to Redis Streams (one capped stream per job, with a TTL); None: the SQL log.
    redis_events_url: str | None = None
    event_stream_maxlen: int = Field(2000, ge=10)
    event_stream_ttl_seconds: int = Field(3600, ge=1)
    # The reaper in each API replica: lease expiry checks, and wakes for queued jobs left unwoken.
    reaper_seconds: float = Field(2.0, gt=0)
    wake_sweep_seconds: float = Field(30.0, gt=0)
    # The artifact store shared by replicas and workers: None is `<data_dir>/images` (a shared
    # directory in multi-node mode); s3://bucket/prefix stores images in S3 (boto3 credentials).
    artifact_url: str | None = None
    s3_endpoint_url: str | None = None

    @property
    def auth_enabled(self) -> bool:
        """Whether requests need an API key: `auth`, with auto meaning "when not on loopback"."""
        if self.auth == "auto":
            return not is_loopback(self.host)
        return self.auth == "on"

    @property
    def rate_limit_redis_url(self) -> str | None:
        """Where API replicas share their rate-limit buckets: the broker's Redis in multi-node mode."""
        if self.broker_url and self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return None

    @property
    def resolved_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        return f"sqlite:///{(self.data_dir / 'genserve.db').resolve()}"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def videos_dir(self) -> Path:
        """Video files, segment frames and video reports (a directory the workers share)."""
        return self.data_dir / "videos"

    @property
    def inputs_dir(self) -> Path:
        """Input pictures by content hash (with S3: the local cache of the inputs/ prefix)."""
        return self.data_dir / "inputs"
