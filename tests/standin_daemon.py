"""`ocr-daemon run` with a stand-in OCR engine, for tests that run several real daemon processes
(claims, leases, kills) where real OCR would only add minutes. Not a test module.

    python tests/standin_daemon.py   # environment as for ocr-daemon; STANDIN_SECONDS per page
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.config import load_settings
from daemon.hardware.providers import ProviderChoice
from daemon.logs import setup_logging
from daemon.results import Image, Line, PageResult
from daemon.service import Hardware, run

BOX = ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0))


class StandInEngine:
    """Reads every page as one line naming this process, after STANDIN_SECONDS."""

    provider = "cpu"
    device = "cpu"
    thread_safe = True

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        time.sleep(float(os.environ.get("STANDIN_SECONDS", "0.05")) * len(images))
        return [PageResult(lines=(Line(f"read by {os.getpid()}", 0.9, BOX),)) for _ in images]

    def warmup(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


if __name__ == "__main__":
    settings = load_settings()
    setup_logging(settings.log)
    run(settings, probe=lambda _settings: Hardware(ProviderChoice("cpu", reason="stand-in engine"),
                                                   None, None),
        build=lambda _settings, _choice, workers: [StandInEngine()
                                                   for _ in range(workers)])
