"""What the routes depend on, held once per app in `app.state.services`."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from genserve.artifacts.images import ImageStore
from genserve.artifacts.inputs import InputStore
from genserve.artifacts.s3 import make_input_store
from genserve.config import Settings
from genserve.engine.models.registry import ModelInfo, registered_models
from genserve.store.jobs import JobStore
from genserve.worker.supervisor import Supervisor


class ModelCatalog:
    """The models directory as the API sees it: rescanned at most every `ttl` seconds, so new models
    show up without a restart, and every request does not walk the disk."""

    def __init__(self, settings: Settings, ttl: float = 5.0) -> None:
        self.settings = settings
        self.ttl = ttl
        self._models: dict[str, ModelInfo] = {}
        self._scanned_at = float("-inf")
        self._lock = threading.Lock()

    def models(self) -> dict[str, ModelInfo]:
        with self._lock:
            if time.monotonic() - self._scanned_at > self.ttl:
                self._models = registered_models(self.settings)
                self._scanned_at = time.monotonic()
            return self._models


@dataclass
class Services:
    settings: Settings
    store: JobStore
    images: ImageStore
    catalog: ModelCatalog
    supervisor: Supervisor | None = None
    inputs: InputStore | None = None  # input pictures; from the settings when not given

    def __post_init__(self) -> None:
        if self.inputs is None:
            self.inputs = make_input_store(self.settings)


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]
