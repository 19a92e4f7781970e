"""OpenCC's Chinese script tables, each converter built once on first use and shared: the
engine turns Simplified forms the models read into Traditional (`s2t`, `daemon.ocr.script`),
search folds Traditional to Simplified (`t2s`, `daemon.store.fold`). Building one costs tens
of milliseconds and memory; whether one may be used from several threads at once is not
documented, so calls are serialised."""

from __future__ import annotations

import threading
from typing import Any, Literal

_converters: dict[str, Any] = {}
_lock = threading.Lock()


def convert(text: str, table: Literal["s2t", "t2s"]) -> str:
    with _lock:
        converter = _converters.get(table)
        if converter is None:
            import opencc

            converter = _converters[table] = opencc.OpenCC(f"{table}.json")
        return str(converter.convert(text))
