"""The model files and RapidOCR configuration the engines run, from the installed rapidocr
package only: RapidOCR downloads missing models at run time; the daemon never does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import OcrSettings
from daemon.errors import ConfigError
from daemon.hardware.providers import CPU
from daemon.ocr.rapid import rapidocr_params
from daemon.results import PageBound


@dataclass(frozen=True)
class ModelPaths:
    det: Path
    cls: Path
    rec: Path


def load_rapidocr_config(ocr: OcrSettings) -> Any:
    """RapidOCR's own configuration with our settings applied, as `RapidOCR()` would build it."""
    from rapidocr.main import DEFAULT_CFG_PATH
    from rapidocr.utils.parse_parameters import ParseParams

    cfg = ParseParams.load(DEFAULT_CFG_PATH)
    return ParseParams.update_batch(cfg, rapidocr_params(ocr, CPU))


def page_bound(ocr: OcrSettings) -> PageBound | None:
    """The sides both engines bring every page within (RapidOCR's preprocessing, its own
    settings), so that decoding may make large JPEGs no larger than that; None when pages
    reach the models at their own size, or with ocr.jpeg_scaled_decode off."""
    if not ocr.jpeg_scaled_decode:
        return None
    settings = load_rapidocr_config(ocr).Global
    if not settings.use_preprocess_img:
        return None
    return PageBound(int(settings.min_side_len), int(settings.max_side_len))


def resolve_model_paths(ocr: OcrSettings, cfg: Any | None = None) -> ModelPaths:
    """The model files RapidOCR would use for `ocr.lang`, from the installed package.

    RapidOCR downloads missing models at run time; the daemon never does, so a missing file is
    a configuration error naming the file to install.
    """
    from rapidocr.inference_engine.base import FileInfo, InferSession
    from rapidocr.main import root_dir

    cfg = cfg if cfg is not None else load_rapidocr_config(ocr)
    model_dir = Path(root_dir) / "models"
    paths: dict[str, Path] = {}
    for section in ("Det", "Cls", "Rec"):
        part = cfg[section]
        try:
            info = InferSession.get_model_url(
                FileInfo(
                    engine_type=part.engine_type,
                    ocr_version=part.ocr_version,
                    task_type=part.task_type,
                    lang_type=part.lang_type,
                    model_type=part.model_type,
                )
            )
        except ValueError as exc:
            raise ConfigError(f"ocr.lang={ocr.lang!r}: {exc}") from None
        path = model_dir / Path(str(info["model_dir"])).name
        if not path.is_file():
            raise ConfigError(
                f"ocr.lang={ocr.lang!r} needs the {section.lower()} model {path.name}, which is "
                f"not installed in {model_dir}; the daemon does not download models: put the "
                f"file there (from {info['model_dir']}) or choose another ocr.lang"
            )
        paths[section.lower()] = path
    return ModelPaths(det=paths["det"], cls=paths["cls"], rec=paths["rec"])
