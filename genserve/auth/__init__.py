"""Access control: API keys (stored hashed), per-key rate limits, quotas and model/size limits.

`keys.py` owns the `api_keys` table, `limits.py` the token buckets and quota checks, `deps.py` the
FastAPI dependency that turns an `Authorization` header into a `Principal`.
"""
