"""The pydantic contract: request and response models shared by the API, CLI, worker and engine."""

from genserve.schemas.generation import SAMPLER_NAMES, GenerationParams, LimitError, check_limits
from genserve.schemas.jobs import EventPublic, ImageRef, JobCreate, JobList, JobPublic, JobState

__all__ = [
    "SAMPLER_NAMES",
    "EventPublic",
    "GenerationParams",
    "ImageRef",
    "JobCreate",
    "JobList",
    "JobPublic",
    "JobState",
    "LimitError",
    "check_limits",
]
