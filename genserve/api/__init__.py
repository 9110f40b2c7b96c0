"""The HTTP API: thin FastAPI routes over the job store. Never imports torch."""
