"""The ledger and the text store: SQLAlchemy tables, engines per URL, and the repository.

`daemon.store.repository` is the only module that writes SQL.
"""
