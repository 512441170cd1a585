"""The service's dynamic batching settings for the HTTP phase (``--max-batch-size``, ``--batch-delay-ms``).

The service batches frames from concurrent requests up to ``max_batch_size`` (env
``RETINAEDGE_MAX_BATCH_SIZE``) and waits at most ``batch_delay_ms`` (``RETINAEDGE_BATCH_DELAY_MS``) for a
batch to fill. ``--max-batch-size auto`` (the default) takes the smallest batch size at which ``model.onnx``
alone gave at least 95 % of its most frames/s in the fused phase: the backend's throughput without the
latency of batches larger than it needs.

A service whose :class:`~retinaedge.service.settings.Settings` has no such field (it refuses unknown
``RETINAEDGE_*`` variables) gets neither variable: an explicit option is then a configuration error, and
``auto`` is recorded as not applied, with the reason.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from retinaedge.runtime.errors import ConfigError

AUTO = "auto"
#: Setting name -> environment variable of the service.
ENV = {"max_batch_size": "RETINAEDGE_MAX_BATCH_SIZE", "batch_delay_ms": "RETINAEDGE_BATCH_DELAY_MS"}


def parse_max_batch_size(text: str) -> int | str:
    """``auto`` or an integer >= 1 (argparse type)."""
    if text == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--max-batch-size must be >= 1, got {value}")
    return value


def service_fields() -> set[str]:
    """The setting names the service accepts (its ``Settings.model_fields``)."""
    from retinaedge.service.settings import Settings

    return set(Settings.model_fields)


def check_options(args: argparse.Namespace, fields: set[str] | None = None) -> None:
    """Refuse an explicit batching option the service cannot take (before any phase runs)."""
    fields = service_fields() if fields is None else fields
    explicit = {
        "max_batch_size": getattr(args, "max_batch_size", AUTO) != AUTO,
        "batch_delay_ms": getattr(args, "batch_delay_ms", None) is not None,
    }
    for name, given in explicit.items():
        if given and name not in fields:
            raise ConfigError(
                f"--{name.replace('_', '-')} was given, but this service has no {name} setting "
                f"({ENV[name]} would be refused); leave it out"
            )
    delay = getattr(args, "batch_delay_ms", None)
    if delay is not None and delay < 0:
        raise ConfigError(f"--batch-delay-ms must be >= 0, got {delay}")


#: ``auto`` takes the smallest batch size within this fraction of the most frames/s: a larger batch that
#: is barely faster alone makes every request wait for more frames (latency grows with the batch).
NEAR_BEST = 0.95


def best_batch_size(throughput_by_batch: Sequence[dict[str, Any]]) -> int | None:
    """The smallest batch size whose frames/s is at least :data:`NEAR_BEST` of the most, or None without
    rows."""
    if not throughput_by_batch:
        return None
    most = max(float(row["frames_per_s"]) for row in throughput_by_batch)
    near = [int(r["batch_size"]) for r in throughput_by_batch if float(r["frames_per_s"]) >= NEAR_BEST * most]
    return min(near)


def service_batching(
    args: argparse.Namespace,
    throughput_by_batch: Sequence[dict[str, Any]],
    fields: set[str] | None = None,
) -> dict[str, Any]:
    """What the HTTP phase passes to the service: ``env`` (variables to set) and, for the report,
    ``max_batch_size``, ``max_batch_size_from``, ``batch_delay_ms`` and ``not_applied`` (setting -> reason).
    """
    fields = service_fields() if fields is None else fields
    requested = getattr(args, "max_batch_size", AUTO)
    best = best_batch_size(throughput_by_batch)
    size = best if requested == AUTO else int(requested)
    delay = getattr(args, "batch_delay_ms", None)
    out: dict[str, Any] = {
        "max_batch_size": None,
        "max_batch_size_from": "the smallest model.onnx batch size within 5 % of the most frames/s"
        if requested == AUTO
        else "--max-batch-size",
        "best_model_batch_size": best,
        "batch_delay_ms": None,
        "env": {},
        "not_applied": {},
    }
    for name, value in (("max_batch_size", size), ("batch_delay_ms", delay)):
        if value is None:
            continue
        if name not in fields:
            out["not_applied"][name] = f"this service has no {name} setting"
            continue
        out[name] = value
        out["env"][ENV[name]] = f"{value:g}" if isinstance(value, float) else str(value)
    return out
