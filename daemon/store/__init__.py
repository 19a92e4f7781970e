"""The ledger and the text store: SQLAlchemy tables, engines per URL, the ledger's statements
and queries, and the database-outage policy.

Only `daemon.store` imports SQLAlchemy: its edge (`access.guarded`) turns the driver's errors
into `StoreError` / `DatabaseUnavailable`. Value types in `records`, the worker path's
statements in `statements` and the path itself in `ledger`, the operator commands in
`operator`, search in `search`, bulk export in `export`.
"""
