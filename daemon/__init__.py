"""ocr-daemon: a directory-watching OCR ingestion daemon."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ocr-daemon")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
