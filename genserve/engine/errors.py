"""Engine errors. Their messages are user-facing: they say what went wrong without a stack trace.

Torch-free, so the worker and the API can name them without importing the ML stack.
"""

from __future__ import annotations


class EngineError(Exception):
    """A generation or model load failed."""


class ModelLoadError(EngineError):
    """A model could not be loaded: unknown name, corrupt or missing files, no config for a single file."""


class OutOfMemory(EngineError):
    """The device ran out of memory; the message names the image size and batch."""


class UnsupportedSampler(EngineError):
    """The sampler does not work with the model's family (see registry.SUPPORTED_SAMPLERS)."""
