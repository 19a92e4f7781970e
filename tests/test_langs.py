"""Offline languages: what the installed rapidocr's bundled models cover, checked on disk."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.ocr import langs
from daemon.ocr.langs import supported_langs, validate_lang


def test_bundled_ppocrv6_covers_chinese_japanese_and_latin_scripts() -> None:
    offline = supported_langs()
    assert {"ch", "chinese_cht", "en", "japan", "german", "fr", "pl", "vi"} <= set(offline)
    assert not {"korean", "arabic", "cyrillic", "devanagari", "th"} & set(offline)
    assert offline == sorted(offline)


def test_every_offline_language_and_alias_validates() -> None:
    for lang in [*supported_langs(), "zh", "zh-tw", "ja"]:
        validate_lang(lang)


def test_language_of_another_model_version_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"ocr.lang='korean'.*downloaded") as exc:
        validate_lang("korean")
    assert "en" in str(exc.value)  # the message lists what does work


def test_unknown_language_is_refused() -> None:
    with pytest.raises(ConfigError, match="rapidocr has no model for it"):
        validate_lang("klingon")


def test_a_missing_model_file_is_noticed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = langs._models_dir()
    monkeypatch.setattr(langs, "_models_dir", lambda: tmp_path)
    assert supported_langs() == []
    with pytest.raises(ConfigError, match=r"PP-OCRv6_rec_small\.onnx.*would download"):
        validate_lang("en")

    for name in ("PP-OCRv6_det_small.onnx", "PP-OCRv6_rec_small.onnx"):
        shutil.copyfile(real / name, tmp_path / name)
    assert "en" in supported_langs()
    validate_lang("en")


def test_checking_is_cheap_no_model_is_loaded() -> None:
    code = (
        "import sys; from daemon.ocr.langs import supported_langs, validate_lang; "
        "supported_langs(); validate_lang('en'); "
        "assert 'onnxruntime' not in sys.modules, 'onnxruntime was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_rapidocr_really_builds_an_offline_language_without_the_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cross-check: what we call offline, rapidocr loads and runs with connections refused."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont
    from rapidocr import RapidOCR

    def no_network(*_args: object) -> None:
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    image = Image.new("RGB", (320, 64), "white")
    ImageDraw.Draw(image).text(
        (10, 10), "Hallo Welt", fill="black", font=ImageFont.load_default(size=36)
    )
    engine = RapidOCR(params={"Rec.lang_type": "german", "Global.log_level": "warning"})
    result = engine(np.asarray(image)[:, :, ::-1], use_det=False, use_cls=False, use_rec=True)
    assert getattr(result, "txts", None) == ("Hallo Welt",)
