"""The durable job store: the single source of truth for jobs, on SQLite or PostgreSQL.

- `genserve.store.db`: engine, tables, clock and transactions.
- `genserve.store.jobs`: `JobStore`, every job state transition and the event it emits.

Nothing is re-exported here: `genserve.events.log` imports `genserve.store.db`, and a re-export of
`JobStore` (which imports the event log) would make that import circular.
"""
