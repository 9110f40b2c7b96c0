"""Structured JSON logs, one object per line. Fields passed via `extra=` (job_id, worker_id) are kept."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log would print every SSE poll; keep warnings and errors only.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def silence_library_noise() -> None:
    """Drop library warnings that say nothing about what the user asked for.

    transformers warns twice on every diffusers import that torchvision is missing and it falls back
    to its PIL image processors; genserve uses no image processor of transformers' (issue 15).
    """
    logging.getLogger("transformers.utils.import_utils").addFilter(
        _DropMessages("requires torchvision (not installed); falling back to")
    )
