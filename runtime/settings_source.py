"""Where settings come from: defaults < config file (``RETINAEDGE_CONFIG_FILE``, JSON) < environment
(``RETINAEDGE_<NAME>``) < explicit overrides, validated into a pydantic-settings class.

One implementation for every settings class: the service's (:mod:`retinaedge.service.settings`) and the
TensorRT backend's engine settings (:mod:`retinaedge.runtime.backends.tensorrt.settings`), which the
service's extend, so a CLI verb that opens the engine the service would serve with reads the same values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings
from retinaedge.runtime.errors import ConfigError

PREFIX = "RETINAEDGE_"
CONFIG_FILE_VARIABLE = "RETINAEDGE_CONFIG_FILE"

S = TypeVar("S", bound=BaseSettings)


def config_file_values() -> dict[str, Any]:
    """The JSON object in ``RETINAEDGE_CONFIG_FILE`` (empty when it is not set).

    Raises :class:`ConfigError` naming the file when it cannot be read or holds no JSON object.
    """
    config_file = os.environ.get(CONFIG_FILE_VARIABLE)
    if not config_file:
        return {}
    try:
        values = json.loads(Path(config_file).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {config_file}: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"config file {config_file} must hold a JSON object")
    return values


def environment_names() -> set[str]:
    """Setting names given in the environment (``RETINAEDGE_MAX_BATCH_SIZE`` -> ``max_batch_size``)."""
    return {k[len(PREFIX) :].lower() for k in os.environ if k.startswith(PREFIX)}


def build_settings(cls: type[S], values: dict[str, Any]) -> S:
    """``cls(**values)`` (the environment is read by ``cls`` itself and wins over ``values`` it does not
    override explicitly); raises :class:`ConfigError` with every invalid field named."""
    try:
        return cls(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc


def file_values_below_environment(fields: set[str] | None = None) -> dict[str, Any]:
    """The config file's values that the environment does not set (the environment wins), limited to
    ``fields`` when given (a settings class that reads only some of the file's keys)."""
    env = environment_names()
    return {k: v for k, v in config_file_values().items() if k not in env and (fields is None or k in fields)}
