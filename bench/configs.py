"""``retinaedge benchmark --config NAME``: benchmark a model size users bring instead of ``--model``.

The bundle is made by ``python -m retinaedge.bench.models`` in its own process (torch and the
export package stay out of the benchmark's process): exported the first time into ``--config-cache``,
reused after (see that module for the recipes and the cache's rule).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

from retinaedge.runtime.errors import BenchmarkError, ConfigError

log = logging.getLogger(__name__)

#: ``--config`` names (their recipes: ``retinaedge.bench.models.CONFIGS``, imported only in the
#: export's own process, where torch is).
MODEL_CONFIGS = ("r50-fpn-512",)
EXPORT_MODULE = "retinaedge.bench.models"


def default_config_cache() -> Path:
    """``$XDG_CACHE_HOME/retinaedge/benchmark-models`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "retinaedge" / "benchmark-models"


def config_bundle(args: argparse.Namespace) -> Path:
    """The bundle of ``--config``: exported (or found in ``--config-cache``) by
    ``python -m retinaedge.bench.models`` in its own process; its directory."""

    if args.model is not None:
        raise ConfigError("give --model or --config, not both")
    if not torch_importable():
        raise ConfigError(
            f"--config {args.config} exports its model with torch: install the export extra "
            "(pip install 'retinaedge[export]', or make benchmark-r50)"
        )
    argv = [sys.executable, "-m", EXPORT_MODULE, args.config, "--cache", str(args.config_cache)]
    if args.checkpoint:
        argv += ["--checkpoint", str(args.checkpoint)]
    log.info("benchmark configuration %s: bundle in %s", args.config, args.config_cache)
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=args.runner_timeout * 4)
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkError(
            f"exporting {args.config} took more than {args.runner_timeout * 4:.0f} s"
        ) from exc
    if proc.returncode != 0 or not proc.stdout.strip():
        raise BenchmarkError(
            f"exporting {args.config} failed with status {proc.returncode} (its log is above)"
        )
    return Path(proc.stdout.strip().splitlines()[-1])


def torch_importable() -> bool:
    """Whether torch and torchvision can be imported here (found without importing them)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("torch", "torchvision"))
    except (ImportError, ValueError):
        return False
