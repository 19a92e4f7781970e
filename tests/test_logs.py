"""The text log: one line per event, whatever a producer names its files."""

from __future__ import annotations

import json
import logging

import pytest

from daemon.config import LogSettings
from daemon.logs import escape_controls, setup_logging


@pytest.fixture
def restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_file_name_cannot_forge_log_lines(capsys: pytest.CaptureFixture[str],
                                            restore_logging: object) -> None:
    setup_logging(LogSettings(format="text", level="INFO"))
    name = "/in/a.png\n2026-01-01 00:00:00 ERROR   daemon: forged\r\x1b[31mred\u2028.png"
    logging.getLogger("daemon.intake").info("seen %s (12 bytes)", name)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert "a.png\\n2026-01-01" in lines[0] and "\\x1b[31m" in lines[0] and "\\u2028" in lines[0]
    assert lines[0].endswith("(12 bytes)")


def test_unicode_names_are_shown_as_they_are() -> None:
    assert escape_controls("/in/ünïcødé 文字.png") == "/in/ünïcødé 文字.png"


def test_a_traceback_keeps_its_lines(capsys: pytest.CaptureFixture[str],
                                     restore_logging: object) -> None:
    setup_logging(LogSettings(format="text", level="INFO"))
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("daemon.pipeline").exception("decoding %s crashed", "x\ny")
    err = capsys.readouterr().err
    assert "decoding x\\ny crashed" in err and "Traceback" in err.splitlines()[1]


def test_json_lines_stay_one_per_event(capsys: pytest.CaptureFixture[str],
                                       restore_logging: object) -> None:
    setup_logging(LogSettings(format="json", level="INFO"))
    logging.getLogger("daemon.intake").info("seen %s", "a\nb.png")
    [line] = capsys.readouterr().err.splitlines()
    assert json.loads(line)["msg"] == "seen a\nb.png"
