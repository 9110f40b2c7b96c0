"""Settings: the only place that reads environment variables and defaults.

Every other module receives a `Settings` (or a piece of it) explicitly.
Environment variables use the `GENSERVE_` prefix; nested fields use `__`,
for example `GENSERVE_LIMITS__MAX_STEPS=50`.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Nothing may fetch weights from a hub at run time; set before diffusers/transformers import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


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
    # None allows every model found in the models directory.
    allowed_models: list[str] | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENSERVE_", env_nested_delimiter="__", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 7860
    data_dir: Path = Path("data")
    models_dir: Path = Path("models")
    # SQLAlchemy URL of the job store; None means SQLite at <data_dir>/genserve.db.
    store_url: str | None = None
    default_model: str = "genserve-tiny"
    # Write a tiny random-weight SD1.5 pipeline as the default model when it is missing.
    bootstrap_default_model: bool = True

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
    long_queue_share: float = Field(0.25, ge=0, le=1)
    # Batch limits in images: keys "model@WxH", "model", "*@WxH" or "*" (JSON in the environment).
    # Without one, the worker estimates from free GPU memory, or uses the default below on CPU.
    batch_limits: dict[str, int] = {}
    default_max_batch_images: int = Field(8, ge=1)

    limits: Limits = Limits()

    @property
    def resolved_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        return f"sqlite:///{(self.data_dir / 'genserve.db').resolve()}"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"
