"""The engine: batching, shape buckets, host stages and device runs; the plain-RapidOCR
reference engine; the bundled models and languages.

Sessions come from `daemon.hardware`; results go back as `daemon.results.PageResult` values.
Never imports the store.
"""
