"""Worker process entry point: `python -m genserve.worker`.

`genserve serve` starts and supervises these; the settings arrive as JSON in GENSERVE_WORKER_SETTINGS
so the worker runs with exactly the configuration of the server that started it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from genserve import tracing
from genserve.artifacts.images import ImageStore
from genserve.config import Settings
from genserve.engine.engine import engine_from_settings
from genserve.engine.models.registry import registered_models
from genserve.logs import configure_logging
from genserve.store.jobs import JobStore
from genserve.worker.loop import Worker, new_worker_id

log = logging.getLogger("genserve.worker")


def main() -> int:
    configure_logging()
    raw = os.environ.get("GENSERVE_WORKER_SETTINGS")
    settings = Settings.model_validate_json(raw) if raw else Settings()
    worker_id = os.environ.get("GENSERVE_WORKER_ID") or new_worker_id()
    tracing.configure_tracing(settings, "genserve-worker")

    stop = threading.Event()
    # SIGTERM/SIGINT: finish the job at hand, then exit (a warm shutdown).
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    store = JobStore.from_url(settings.resolved_store_url)
    engine = engine_from_settings(registered_models(settings), settings)
    worker = Worker(settings, store, engine, ImageStore(settings.images_dir), worker_id)
    log.info("worker starting", extra={"worker_id": worker_id, "device": engine.device})
    try:
        worker.run_forever(stop)
    finally:
        store.remove_worker(worker_id)
        tracing.shutdown()  # flush the last spans
    return 0


if __name__ == "__main__":
    sys.exit(main())
