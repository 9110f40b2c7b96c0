"""Job events: the durable per-job log that SSE streams read and resume from (`genserve.events.log`)."""
