"""The memory budget: decoding waits for room, a page over the budget goes alone, nothing
waits on itself; and through the real pipeline, what is held stays under the budget."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image as PILImage
from PIL import ImageDraw

from daemon.budget import ByteBudget
from daemon.results import Image, PageResult
from daemon.sizing import decode_threads
from tests.support import SettingsFactory, pipeline_running, wait_until

MB = 1 << 20


def never() -> bool:
    return False


def test_a_page_waits_for_room_and_is_woken_by_a_release() -> None:
    budget = ByteBudget(100 * MB)
    assert budget.acquire_page(60 * MB, never)
    got = threading.Event()

    def second() -> None:
        budget.acquire_page(60 * MB, never)
        got.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert not got.wait(0.5)  # 120 MB would not fit: it waits (a release ends the wait)
    budget.release_page(60 * MB)
    assert got.wait(5)
    thread.join()
    assert budget.used == 60 * MB


def test_a_page_over_the_budget_goes_alone() -> None:
    budget = ByteBudget(100 * MB)
    assert budget.acquire_page(300 * MB, never)  # nothing else held: processed, not refused
    assert budget.acquire_page(1 * MB, lambda: True) is False  # the rest waits meanwhile
    budget.release_page(300 * MB)
    assert budget.acquire_page(1 * MB, never)


def test_raw_bytes_do_not_block_their_own_pages() -> None:
    """Two documents being decoded hold their raw bytes while their first pages wait: the
    pages do not count those (only the pages' release could free them), so neither waits on
    itself, and one page at a time goes when no page is held."""
    budget = ByteBudget(100 * MB)
    assert budget.acquire_raw(45 * MB, never)
    assert budget.acquire_raw(45 * MB, never)
    assert budget.acquire_page(80 * MB, never)  # over, but no page is held
    assert budget.acquire_page(80 * MB, lambda: True) is False  # one page is: wait
    assert budget.acquire_raw(1 * MB, lambda: True) is False  # full: a new file waits too
    budget.release_page(80 * MB)
    budget.release_raw(45 * MB)
    budget.release_raw(45 * MB)
    assert budget.used == 0
    assert budget.acquire_raw(500 * MB, never)  # a file over the budget is read alone


def test_a_cancelled_wait_takes_nothing() -> None:
    budget = ByteBudget(10 * MB)
    assert budget.acquire_page(10 * MB, never)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    assert budget.acquire_page(5 * MB, stop.is_set) is False
    assert budget.used == 10 * MB


# -- through the pipeline ------------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS, which is returned."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def peak_rss() -> int:
    return _status_kb("VmHWM")


class SlowEngine:
    """Slower than decoding, so pages pile up in front of it unless something holds them."""

    provider = "cpu"
    device = "cpu"

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        time.sleep(0.3 * len(images))
        return [PageResult() for _ in images]

    def close(self) -> None:
        pass


def large_page(path: Path, number: int, size: tuple[int, int] = (3000, 4000)) -> int:
    """A mostly white page (small as PNG, 36 MB decoded); returns its decoded bytes."""
    image = PILImage.new("RGB", size, "white")
    ImageDraw.Draw(image).text((100, 100 + number * 10), f"page {number}", fill="black")
    temp = path.with_name(path.name + ".part")
    image.save(temp, "PNG", compress_level=1)
    temp.rename(path)
    return size[0] * size[1] * 3


def test_pages_held_stay_under_the_budget(settings_factory: SettingsFactory) -> None:
    """20 large pages through the real watcher, ledger and decoder into an engine slower than
    decoding: what is held (pages, and each decode's peak while it runs) never passes the
    budget, and the process's peak RSS grows by less than the budget plus what the decode
    threads and the engine's batch touch. Without the budget (the page-count bound alone) it
    held 641 MB and grew 679 MB here; with it, 149 MB and 268 MB."""
    budget = 160 * MB  # a decode's peak (~120 MB) and a page
    settings = settings_factory(queue={"memory_budget_bytes": budget},
                                batch={"max_pages": 4, "decode_threads": 2})
    staging = settings.watch.path.parent / "staging"
    staging.mkdir()
    page_bytes = max(large_page(staging / f"large-{n:02}.png", n) for n in range(20))
    with pipeline_running(settings, SlowEngine()) as (pipeline, ledger, _):
        peak = 0
        rss_before = reset_peak_rss()
        for page in sorted(staging.iterdir()):  # all at once
            page.rename(settings.watch.path / page.name)

        def sample() -> bool:
            nonlocal peak
            peak = max(peak, pipeline._budget.used)
            return ledger.counts()["done"] == 20

        assert wait_until(sample, 120)
        rss_growth = peak_rss() - rss_before
    # beyond the budget: what each decode thread's malloc arena keeps of a conversion's
    # scratch, and the engine's batch
    decoding = decode_threads(settings, "cpu") * 3 * page_bytes
    assert rss_growth < budget + decoding + settings.batch.max_pages * page_bytes, rss_growth
    assert page_bytes < peak <= budget, peak
    assert pipeline._budget.used == 0  # every byte given back
