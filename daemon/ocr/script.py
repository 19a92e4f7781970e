"""Traditional Chinese text from a recogniser that sometimes reads it as Simplified.

The bundled PP-OCR recogniser has one dictionary for both scripts, and on Traditional pages it
writes some characters in their Simplified form (税 for 稅, 营 for 營): most of its wrong
characters on rendered Traditional pages. `ocr.lang = "chinese_cht"` reads exactly as "ch".

Converting the whole text with OpenCC fixes those but also changes correct Traditional text,
where a character is written in both scripts with another use (干擾 becomes 幹擾, 范先生
範先生). So only characters Traditional Chinese never writes change: those outside Big5 (code
page 950), each taking OpenCC's conversion in the context of its line (头发 -> 頭髮, not 頭發).
Character F1 on 60 rendered Traditional pages: 0.9918 as read, 0.9969 so (benchmarks/NOTES.md,
"Traditional Chinese output").
"""

from __future__ import annotations

import functools

from daemon.config import OcrSettings
from daemon.conversion import convert
from daemon.results import Line, PageResult

TRADITIONAL_LANGS = frozenset({"chinese_cht", "zh_tw", "zh-tw"})  # with rapidocr's aliases


def wants_traditional(ocr: OcrSettings) -> bool:
    """`ocr.chinese_script`: "traditional", or "auto" with `ocr.lang = "chinese_cht"`."""
    if ocr.chinese_script == "auto":
        return ocr.lang.strip().lower() in TRADITIONAL_LANGS
    return ocr.chinese_script == "traditional"


@functools.lru_cache(maxsize=65536)
def _kept(char: str) -> bool:
    """Left as read: below the CJK blocks (Latin and the like), or written in Traditional
    Chinese too (encodable in Big5, code page 950)."""
    if ord(char) < 0x2E80:
        return True
    try:
        char.encode("cp950")
    except UnicodeEncodeError:
        return False
    return True


def _s2t(text: str) -> str:
    return convert(text, "s2t")


def to_traditional(text: str) -> str:
    """`text` with each character Traditional Chinese never writes (outside Big5) in its
    Traditional form, as OpenCC converts it in the context of the whole text."""
    if all(_kept(c) for c in text):
        return text  # nothing to change (Latin, or Traditional already): no OpenCC call
    converted = _s2t(text)
    if len(converted) != len(text):  # a phrase changed length: character by character
        singles = [_s2t(c) for c in text]
        converted = "".join(one if len(one) == 1 else c
                            for one, c in zip(singles, text, strict=True))
    return "".join(old if _kept(old) else new for old, new in zip(text, converted, strict=True))


def traditional_result(result: PageResult) -> PageResult:
    """`result` with every line's text through `to_traditional`."""
    lines = tuple(Line(to_traditional(line.text), line.score, line.box)
                  for line in result.lines)
    return PageResult(lines=lines, source=result.source, timings=result.timings)
