"""Placeholder metrics (replaced by the full registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, version: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.files_total = Counter("ocr_files", "Files by outcome", ["status"], registry=r)
        self.pages_total = Counter("ocr_pages", "Pages stored", registry=r)
        self.queue_depth = Gauge("ocr_queue_depth", "Documents in flight", registry=r)
        self.queue_capacity = Gauge("ocr_queue_capacity", "Queue capacity", registry=r)
        self.batch_size = Histogram("ocr_batch_size", "Pages per batch", registry=r)
        self.stage_seconds = Histogram("ocr_stage_seconds", "Stage time", ["stage"], registry=r)
        self.file_latency_seconds = Histogram("ocr_file_latency_seconds", "Seen to stored",
                                              registry=r)
        self.provider_fallbacks_total = Counter("ocr_provider_fallbacks", "Fallbacks",
                                                ["reason"], registry=r)

    def observe_pages(self, n: int) -> None:
        self.pages_total.inc(n)
