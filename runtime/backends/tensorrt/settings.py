"""The engine settings: which TensorRT engine to build or load, and where the engine cache is.

:class:`EngineConfig` holds the ``RETINAEDGE_ENGINE_*`` settings (and the two others an engine depends
on: ``max_batch_size``, the batch profile's maximum, and ``data_dir``, the cache's default parent). The
service's settings extend it (:class:`retinaedge.service.settings.Settings`), so ``retinaedge serve``,
``retinaedge boot`` and the CLI verbs' ``--backend tensorrt|auto`` (:func:`load_engine_config`) read the
same values from the same places (:mod:`retinaedge.runtime.settings_source`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from retinaedge.runtime.backends.base import BackendOptions
from retinaedge.runtime.backends.tensorrt.options import BuildOptions
from retinaedge.runtime.bundle import Bundle
from retinaedge.runtime.settings_source import build_settings, file_values_below_environment


class EngineConfig(BaseSettings):
    """The engine settings; sizes in bytes, times in seconds."""

    model_config = SettingsConfigDict(env_prefix="RETINAEDGE_", extra="ignore", frozen=True)

    max_batch_size: int = Field(
        default=4,
        ge=1,
        description="frames per inference batch at most, from any requests (also the TensorRT engine's "
        "batch profile maximum)",
    )
    data_dir: Path = Field(default=Path("retinaedge-data"), description="spool and SQLite database")
    engine_cache_dir: Path | None = Field(default=None, description="engine cache (default data_dir/engines)")
    engine_cache_max_bytes: int = Field(default=4 * 1024**3, ge=0, description="engine cache size budget")
    engine_build: bool = Field(default=True, description="build a missing engine at start-up (minutes)")
    engine_precision: Literal["fp32", "fp16", "int8"] = "fp32"
    engine_dla_core: int | None = Field(default=None, ge=0, description="DLA core (GPU fallback on)")
    engine_workspace_mib: int = Field(default=1024, ge=1)
    engine_nms: Literal["auto", "plugin", "builtin"] = "auto"
    engine_build_while: Literal["not_ready", "onnxruntime"] = Field(
        default="not_ready",
        description="while an engine builds: report not ready, or serve with ONNX Runtime and build in a "
        "child process, switching to the engine once it is built and validated",
    )
    engine_build_retry_s: float = Field(
        default=24 * 3600.0, ge=0, description="a failed engine build is not retried on start-up before this"
    )

    def build_options(self) -> BuildOptions:
        """The engine build options these settings ask for (batch profile 1 / max_batch_size / max_batch_size)."""
        return BuildOptions(
            precision=self.engine_precision,
            dla_core=self.engine_dla_core,
            batch_min=1,
            batch_opt=self.max_batch_size,
            batch_max=self.max_batch_size,
            workspace_mib=self.engine_workspace_mib,
            nms=self.engine_nms,
        )

    @property
    def engine_cache_root(self) -> Path:
        """The engine cache directory: ``engine_cache_dir``, else ``data_dir/engines``."""
        return self.engine_cache_dir if self.engine_cache_dir is not None else self.data_dir / "engines"


def load_engine_config(**overrides: Any) -> EngineConfig:
    """The engine settings from defaults < config file < environment < ``overrides`` (the other keys of
    the config file, the service's, are not read here). Raises ConfigError naming every invalid field."""
    values = file_values_below_environment(set(EngineConfig.model_fields))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return build_settings(EngineConfig, values)


@dataclass(frozen=True)
class EngineSettings:
    """Which engine to use and where to find it: build options, cache directory and budget (bytes),
    whether a missing engine may be built and how long (s) a failed build blocks another attempt."""

    build_options: BuildOptions
    cache_root: Path
    cache_max_bytes: int | None
    allow_build: bool
    retry_after_s: float


def engine_settings(bundle: Bundle, options: BackendOptions) -> EngineSettings:
    """The engine the service would serve ``bundle`` with: the engine settings (``RETINAEDGE_*``
    environment, ``RETINAEDGE_CONFIG_FILE``, defaults; :func:`.settings.load_engine_config`) give the
    build options (precision, DLA, NMS, workspace, batch profile 1 / max_batch_size / max_batch_size) and the
    engine cache. ``options.extra["build_options"]`` and ``options.cache_dir`` override them;
    ``options.allow_build=False`` or ``engine_build=false`` forbid a build."""
    settings = load_engine_config()
    return EngineSettings(
        build_options=options.extra.get("build_options") or settings.build_options(),
        cache_root=options.cache_dir or settings.engine_cache_root,
        cache_max_bytes=options.extra.get("cache_max_bytes", settings.engine_cache_max_bytes),
        allow_build=options.allow_build and settings.engine_build,
        retry_after_s=settings.engine_build_retry_s,
    )
