"""Bytes -> pages: images, multi-page TIFFs, PDFs (rendered, or their text layer).

Knows nothing of models: the pages it yields are plain `daemon.results.Page` values.
"""
