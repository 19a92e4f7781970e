"""Traditional Chinese output (`ocr.chinese_script`): the characters Traditional Chinese never
writes become Traditional, and nothing else changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from daemon.config import OcrSettings
from daemon.hardware.providers import CPU
from daemon.ocr.batch import BatchEngine
from daemon.ocr.rapid import RapidOcrEngine
from daemon.ocr.script import to_traditional, wants_traditional
from daemon.results import Image as BgrImage

FONT = Path(__file__).parent / "fonts" / "DroidSansFallback-test-subset.ttf"


def simplified_line(text: str) -> BgrImage:
    """A line printed in Simplified characters (all the test font holds), on a white page."""
    font = ImageFont.truetype(str(FONT), 40)
    image = Image.new("RGB", (44 * len(text) + 80, 120), "white")
    ImageDraw.Draw(image).text((40, 36), text, fill="black", font=font)
    return np.ascontiguousarray(np.asarray(image)[:, :, ::-1])


def test_simplified_only_characters_become_traditional_in_the_context_of_the_line() -> None:
    assert to_traditional("统一发票 税额 NT$120") == "統一發票 稅額 NT$120"
    assert to_traditional("请把包裹送到北门") == "請把包裹送到北門"
    assert to_traditional("头发") == "頭髮"  # the phrase, not character by character (頭發)
    # in a line of both: only the Simplified-only characters change
    assert to_traditional("干擾税额 范先生 后来") == "干擾稅額 范先生 后來"


def test_characters_traditional_chinese_also_writes_are_left_as_read() -> None:
    """Converting everything would change correct Traditional text: 干擾 to 幹擾, 范先生 to
    範先生, 准許 to 準許. Only characters outside Big5 change."""
    for text in ("干擾 范先生 准許 了解 台灣 皇后 後來 裏面 咸豐", "Total 5.00 café Ölçü",
                 "七位", "", "１２３　ＡＢＣ"):
        assert to_traditional(text) == text


def test_auto_means_traditional_for_chinese_cht_and_its_aliases_only() -> None:
    for lang in ("chinese_cht", "zh-tw", "zh_tw"):
        assert wants_traditional(OcrSettings(lang=lang))
        assert not wants_traditional(OcrSettings(lang=lang, chinese_script="as_read"))
    for lang in ("ch", "en", "japan"):
        assert not wants_traditional(OcrSettings(lang=lang))
        assert wants_traditional(OcrSettings(lang=lang, chinese_script="traditional"))


@pytest.mark.parametrize("engine_kind", ["batch", "rapidocr"])
def test_engines_store_traditional_text_for_chinese_cht(engine_kind: str) -> None:
    """The same printed line, read by each engine: as printed with lang "ch", in Traditional
    characters with lang "chinese_cht"."""
    line = simplified_line("请把包裹送到北门")

    def read(lang: str) -> str:
        ocr = OcrSettings(lang=lang)
        engine = BatchEngine(ocr, CPU) if engine_kind == "batch" else RapidOcrEngine(ocr, CPU)
        try:
            return engine.recognize([line])[0].text
        finally:
            engine.close()

    assert read("ch") == "请把包裹送到北门"
    assert read("chinese_cht") == "請把包裹送到北門"
