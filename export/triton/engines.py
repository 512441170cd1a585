"""Engines for ``export-triton --platform tensorrt``: verified entries of the engine cache, one per GPU.

``retinaedge build`` on a GPU stores a validated engine in the engine cache
(:mod:`retinaedge.runtime.backends.tensorrt.cache`), keyed by the ONNX file's sha256, the build options and the device
fingerprint (GPU, compute capability, TensorRT). Triton picks an engine per compute capability
(``cc_model_filenames``), so the repository gets, for each compute capability found in the cache for this
bundle, the engine whose batch profile admits ``max_batch`` (the largest such profile; the newest of
equals). DLA engines (Jetson) are left out: Triton serves them nowhere. Every entry is verified by the
cache's own lookup (manifest, key, fingerprint, engine sha256) before it is used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from retinaedge.runtime.bundle import Bundle
from retinaedge.runtime.errors import ConfigError

log = logging.getLogger(__name__)


def pick_engines(bundle: Bundle, onnx_shas: set[str], cache_root: Path, max_batch: int) -> dict[str, Any]:
    """compute capability -> :class:`~retinaedge.runtime.backends.tensorrt.cache.CacheEntry` for this bundle.

    Raises :class:`ConfigError` naming what the cache holds when no engine fits.
    """
    from retinaedge.runtime.backends.tensorrt.cache import EngineCache
    from retinaedge.runtime.backends.tensorrt.fingerprint import DeviceFingerprint
    from retinaedge.runtime.backends.tensorrt.options import BuildOptions

    if not cache_root.is_dir():
        raise ConfigError(f"engine cache {cache_root} does not exist")
    cache = EngineCache(cache_root)
    best: dict[str, tuple[tuple[int, str], Any]] = {}
    seen: list[str] = []
    for path in sorted(cache_root.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            if doc.get("onnx_sha256") not in onnx_shas:
                continue
            options = BuildOptions.from_dict(doc["options"])
            lo, hi = options.batch_min, options.batch_max
            fingerprint = DeviceFingerprint.from_dict(doc["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("engine cache entry %s skipped: %s", path.name, exc)
            continue
        cc = fingerprint.compute_capability
        seen.append(f"{path.stem[:12]} (sm_{cc.replace('.', '')}, batch {lo}-{hi}, dla {options.dla_core})")
        if options.dla_core is not None or not lo <= 1 or hi < max_batch:
            continue
        found = cache.lookup(doc["onnx_sha256"], options, fingerprint)
        if not found.usable or found.entry is None:
            log.warning("engine cache entry %s not used: %s", path.stem[:12], found.reason)
            continue
        rank = (hi, str(doc.get("created", "")))
        if cc not in best or rank > best[cc][0]:
            best[cc] = (rank, found.entry)
    if not best:
        held = "; ".join(seen) if seen else "no engine of this bundle"
        raise ConfigError(
            f"no engine in {cache_root} fits --max-batch {max_batch} for bundle {bundle.manifest.name} "
            f"(GPU engines with a batch profile 1..>= {max_batch} are needed; the cache holds: {held}). "
            f"Build one on the GPU server: retinaedge build --model DIR --batch 1,{max_batch},{max_batch}"
        )
    return {cc: entry for cc, (_rank, entry) in best.items()}
