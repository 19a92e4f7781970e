from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import Settings, load_settings
from daemon.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_defaults_match_the_contract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ./config.toml here
    settings = load_settings()
    assert settings.watch.path == Path("inbox")
    assert settings.database.url == "sqlite:///./ocr-daemon.db"
    assert (settings.metrics.host, settings.metrics.port) == ("127.0.0.1", 9464)


def test_shipped_config_toml_is_valid_and_equals_the_defaults() -> None:
    assert load_settings(REPO / "config.toml") == Settings()


def test_every_key_in_config_toml_is_commented() -> None:
    lines = (REPO / "config.toml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "[")):
            assert lines[i - 1].strip().startswith("#"), f"no comment above {stripped!r}"


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[watch]\npath = "/from/file"\nsettle_seconds = 3\n[metrics]\nport = 1\n')
    monkeypatch.setenv("OCR_DAEMON_WATCH__PATH", "/from/env")
    monkeypatch.setenv("OCR_DAEMON_METRICS__PORT", "9999")
    settings = load_settings(config)
    assert settings.watch.path == Path("/from/env")
    assert settings.watch.settle_seconds == 3
    assert settings.metrics.port == 9999


def test_force_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert not load_settings().cpu_only
    monkeypatch.setenv("FORCE_CPU", "true")
    assert load_settings().cpu_only


@pytest.mark.parametrize(("content", "message"), [
    ("[watch]\nsetle_seconds = 1\n", "unknown key 'watch.setle_seconds'"),
    ("[wach]\npath = 'x'\n", "unknown key 'wach'"),
    ("[queue]\ncapacity = 0\n", "queue.capacity: Input should be greater than or equal to 1"),
    ("[watch]\nafter = 'shred'\n", "watch.after: Input should be 'keep', 'move' or 'delete'"),
    ("[watch\n", "c.toml"),
])
def test_bad_config_names_the_key(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_misspelt_environment_key_is_an_error(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OCR_DAEMON_METRICS__PROT", "1")
    with pytest.raises(ConfigError, match=r"metrics\.prot"):
        load_settings()


def test_missing_explicit_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")
