"""Which `ocr.lang` values the installed rapidocr can run offline, with the models in its wheel.

rapidocr downloads any model it lacks the first time an engine is built. A daemon on a server
(often with no way out, always with a start-up that should not wait on a model host) must
instead refuse such a language at configuration time, with a message that says why.

The answer comes from rapidocr itself, without loading any model: its `config.yaml` gives the
recogniser and detector it builds by default (the daemon only sets `Rec.lang_type`), its model
resolver routes a language to a model key, `default_models.yaml` names that model's file, and
the file must be present in the package's `models/` directory (rapidocr's default
`model_root_dir`). With rapidocr 3.10 that is the PP-OCRv6 small recogniser: ch, chinese_cht,
en, japan and the Latin-script languages.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from daemon.errors import ConfigError

ENGINE = "onnxruntime"


def supported_langs() -> list[str]:
    """The languages (rapidocr's main codes, no aliases) whose models are all on disk, sorted."""
    from rapidocr.utils.model_resolver import list_supported_langs
    from rapidocr.utils.typings import ModelType, OCRVersion, TaskType

    rec = _defaults("Rec")
    if _model_path("Det", _defaults("Det")["lang_type"]) is None:
        return []
    langs = list_supported_langs(
        TaskType.REC, OCRVersion(rec["ocr_version"]), ModelType(rec["model_type"])
    )
    return sorted(lang for lang in langs if _model_path("Rec", lang) is not None)


def validate_lang(lang: str) -> None:
    """Raise `ConfigError` unless `lang` (a code or one of rapidocr's aliases, e.g. "zh", "ja")
    runs with the bundled models alone."""
    rec = _defaults("Rec")
    model = f"rapidocr's {rec['ocr_version']} {rec['model_type']} recognition model"
    if _model_key("Rec", lang) is None:
        elsewhere = _versions_covering(lang)
        why = (
            f"only {', '.join(elsewhere)} models cover it, and those would have to be "
            f"downloaded, which the daemon does not do"
            if elsewhere
            else "rapidocr has no model for it"
        )
        raise ConfigError(
            f"ocr.lang={lang!r} is not covered by {model}; {why}. Languages available "
            f"offline: {', '.join(supported_langs())}"
        )
    if _model_path("Rec", lang) is None:
        raise ConfigError(
            f"ocr.lang={lang!r} needs {_model_file('Rec', lang)}, which is not in rapidocr's "
            f"models directory {_models_dir()} (rapidocr would download it). Languages "
            f"available offline: {', '.join(supported_langs()) or 'none'}"
        )
    det_lang = _defaults("Det")["lang_type"]
    if _model_path("Det", det_lang) is None:
        raise ConfigError(
            f"rapidocr's detection model {_model_file('Det', det_lang)} is missing from "
            f"{_models_dir()}; reinstall rapidocr"
        )


def _versions_covering(lang: str) -> list[str]:
    """The other rapidocr model versions that know `lang`, for the error message."""
    from rapidocr.utils.model_resolver import list_supported_langs, normalize_lang
    from rapidocr.utils.typings import OCRVersion, TaskType

    code = normalize_lang(lang)
    return [version.value for version in OCRVersion
            if code in list_supported_langs(TaskType.REC, version)]


@functools.cache
def _package_dir() -> Path:
    spec = importlib.util.find_spec("rapidocr")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("rapidocr is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _models_dir() -> Path:
    return _package_dir() / "models"


@functools.cache
def _yaml(name: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with (_package_dir() / name).open(encoding="utf-8") as fh:
        loaded: dict[str, Any] = yaml.load(fh, Loader=loader)
    return loaded


def _defaults(task: str) -> dict[str, Any]:
    section: dict[str, Any] = _yaml("config.yaml")[task]
    return section


def _model_key(task: str, lang: str) -> str | None:
    from rapidocr.utils.model_resolver import route_to_model_key
    from rapidocr.utils.typings import ModelType, OCRVersion, TaskType

    cfg = _defaults(task)
    try:
        return route_to_model_key(
            TaskType(task.lower()), OCRVersion(cfg["ocr_version"]), lang,
            ModelType(cfg["model_type"]),
        )
    except ValueError:  # the resolver's "Unsupported ... lang_type"
        return None


def _model_file(task: str, lang: str) -> str | None:
    key = _model_key(task, lang)
    if key is None:
        return None
    cfg = _defaults(task)
    models = _yaml("default_models.yaml")[ENGINE][cfg["ocr_version"]][task.lower()]
    info = models.get(key)
    if not info:
        return None
    return PurePosixPath(str(info["model_dir"])).name


def _model_path(task: str, lang: str) -> Path | None:
    name = _model_file(task, lang)
    if name is None:
        return None
    path = _models_dir() / name
    return path if path.is_file() else None
