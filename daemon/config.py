"""Settings: `config.toml` < environment (`OCR_DAEMON_<SECTION>__<KEY>`, plus `FORCE_CPU`).

Built once by `load_settings`, frozen, and passed down explicitly. A misspelt key or a bad value
is a `ConfigError` whose message names the key, so start-up stops with one clear line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from daemon.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("config.toml")
CONFIG_ENV_VAR = "OCR_DAEMON_CONFIG"

DEFAULT_IGNORES = (".*", "*.part", "*.filepart", "*.tmp", "*.crdownload", "~$*", "Thumbs.db")

# The execution providers the daemon can run on, by the short names config, logs and metrics use.
# "cpu" is onnxruntime on the CPU; "openvino" OpenVINO's runtime on a bf16 CPU or an Intel GPU.
ProviderName = Literal["cpu", "cuda", "tensorrt", "openvino"]
PROVIDER_NAMES: tuple[ProviderName, ...] = get_args(ProviderName)
# The providers that run on an NVIDIA GPU: fixed shape buckets, a session a shape, a warm-up,
# batches in flight per GPU. The others take pages at their own size on the host's cores.
NVIDIA_PROVIDERS = ("cuda", "tensorrt")


def cache_dir() -> Path:
    """Where the daemon keeps what it derives and can always rebuild (TensorRT engines, edited
    models): systemd's CacheDirectory= ($CACHE_DIRECTORY), else the XDG cache."""
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "ocr-daemon"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WatchSettings(_Section):
    path: Path = Path("./inbox")
    recursive: bool = False
    observer: Literal["auto", "native", "polling"] = "auto"
    poll_interval_seconds: float = Field(1.0, gt=0)
    settle_seconds: float = Field(1.0, ge=0)
    rescan_interval_seconds: float = Field(30.0, gt=0)
    ignore: tuple[str, ...] = ()
    extensions: tuple[str, ...] = (
        ".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".pdf",
    )
    after: Literal["keep", "move", "delete"] = "keep"
    done_dir: Path | None = None
    failed_dir: Path | None = None
    max_file_bytes: int = Field(512 * 1024 * 1024, gt=0)
    sidecar: Literal["none", "txt", "json", "both"] = "none"
    sidecar_dir: Path | None = None
    output_pdf: Literal["none", "pdf"] = "none"
    output_dir: Path | None = None

    @property
    def done_folder(self) -> Path | None:
        """Where `after = "move"` puts files: `done_dir`, or `done` inside the watched folder."""
        if self.done_dir is not None:
            return self.done_dir
        return Path("done") if self.after == "move" else None

    @field_validator("extensions")
    @classmethod
    def _lower_dotted(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in value)

    @model_validator(mode="after")
    def _sidecars_not_taken_in(self) -> WatchSettings:
        """A sidecar the watcher took in would be OCR'd (and fail) in a loop."""
        clash = {".txt", ".json"} & set(self.extensions)
        if self.sidecar != "none" and clash:
            raise ValueError(f"sidecar = {self.sidecar!r} writes files the watcher would take "
                             f"in: remove {', '.join(sorted(clash))} from extensions")
        if self.output_pdf != "none" and self.output_dir is None:
            raise ValueError("output_pdf = \"pdf\" needs output_dir: the folder the PDFs go to "
                             "(a relative one is inside the watched folder, skipped by it)")
        return self

    @model_validator(mode="after")
    def _folders_not_over_the_inbox(self) -> WatchSettings:
        """The watcher skips the done, failed and output folders: one equal to or above the
        watched folder (`output_dir = "."`) switched ingestion off, while healthy."""
        root = self.path.expanduser().resolve()
        for key, folder in (("done_dir", self.done_folder), ("failed_dir", self.failed_dir),
                            ("output_dir", self.output_dir)):
            if folder is None:
                continue
            resolved = (root / folder.expanduser()).resolve()  # relative: inside the inbox
            if resolved == root or resolved in root.parents:
                raise ValueError(f"{key} = {str(folder)!r} is the watched folder or above it, "
                                 "which the watcher would skip whole: name a folder inside it "
                                 "or elsewhere")
        return self


class QueueSettings(_Section):
    capacity: int = Field(32, ge=1)
    max_attempts: int = Field(3, ge=1)
    retry_backoff_seconds: float = Field(5.0, ge=0)
    lease_seconds: float = Field(60.0, gt=0)
    memory_budget_bytes: int = Field(1 << 30, gt=0)
    stuck_seconds: float = Field(600.0, gt=0)


class BatchSettings(_Section):
    max_pages: int = Field(4, ge=1)
    max_wait_ms: int = Field(50, ge=0)
    workers: int = Field(0, ge=0)
    decode_threads: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    pdf_processes: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    host_processes: int | Literal["auto"] = "auto"
    stop_timeout_seconds: float = Field(30.0, ge=0)


class OcrSettings(_Section):
    engine: Literal["batch", "rapidocr"] = "batch"
    provider: Literal["auto", ProviderName] = "auto"
    device_id: int = Field(0, ge=0)
    gpus: Literal["all"] | list[int] = "all"
    use_cls: bool = False
    # max/960 measured best on real receipts (F1 0.9156 vs 0.9120 for RapidOCR's min/736) at
    # less than half the memory; see the benchmark notes.
    det_limit_side_len: int = Field(960, ge=32)
    det_limit_type: Literal["min", "max"] = "max"
    text_score: float = Field(0.5, ge=0, le=1)
    lang: str = "ch"
    chinese_script: Literal["auto", "as_read", "traditional"] = "auto"
    intra_op_threads: int = Field(0, ge=0)
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "HEURISTIC"
    gpu_precision: Literal["fp32", "fp16"] = "fp32"
    # OpenVINO's arithmetic: "auto" is bf16 where the CPU has it (else onnxruntime stays)
    cpu_precision: Literal["auto", "bf16", "fp32"] = "auto"
    gpu_mem_limit_bytes: int = Field(0, ge=0)
    # a GPU's warm-up starts no new shape after this long (the daemon serves meanwhile)
    warmup_seconds: float = Field(60.0, ge=0)
    max_image_pixels: int = Field(100_000_000, gt=0)
    jpeg_scaled_decode: bool = True
    max_pages: int = Field(500, ge=1)
    pdf_dpi: int = Field(200, ge=36, le=1200)
    pdf_text_layer: Literal["prefer", "ignore"] = "prefer"


class DatabaseSettings(_Section):
    url: str = "sqlite:///./ocr-daemon.db"
    migrate_on_start: bool = True
    echo: bool = False


class MetricsSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="OCR_DAEMON_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    watch: WatchSettings = WatchSettings()
    queue: QueueSettings = QueueSettings()
    batch: BatchSettings = BatchSettings()
    ocr: OcrSettings = OcrSettings()
    database: DatabaseSettings = DatabaseSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()
    force_cpu: bool = Field(False, validation_alias=AliasChoices("FORCE_CPU", "force_cpu"))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = settings_cls.model_config.get("toml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @property
    def cpu_only(self) -> bool:
        return self.force_cpu or self.ocr.provider == "cpu"


def _format_error(exc: ValidationError, source: str) -> str:
    first = exc.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(root)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key {key!r}"
    return f"{source}: {key}: {first['msg']}"


def load_settings(config_path: Path | None = None, **overrides: Any) -> Settings:
    """Read `config_path` (or $OCR_DAEMON_CONFIG, or ./config.toml when present) and the env.

    An explicitly named file that does not exist is an error; the implicit ./config.toml is
    optional so the daemon starts with its defaults anywhere.
    """
    explicit = config_path or (Path(os.environ[CONFIG_ENV_VAR]) if CONFIG_ENV_VAR in os.environ
                               else None)
    if explicit is not None and not explicit.is_file():
        raise ConfigError(f"config file not found: {explicit}")
    path = explicit or (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None)

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    try:
        loaded = _FileSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, str(path or "environment"))) from None
    except ValueError as exc:  # malformed TOML, unparsable env JSON
        raise ConfigError(f"{path or 'environment'}: {exc}") from None
    return Settings.model_validate(loaded.model_dump(by_alias=False))
