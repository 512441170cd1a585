"""``retinaedge build --model DIR``: model.onnx -> a validated TensorRT engine in the engine cache.

Probes the device, validates the options against it and the model (impossible options are refused,
never changed), builds (or finds the cached engine; ``--force`` rebuilds; a failure is recorded in the cache
so that service start-ups do not retry it at once, while this verb always tries), runs the golden self-test and the detection-aware
comparison with ONNX Runtime, stores the engine with its manifest and prints one JSON object: the cache
key, engine path, fingerprint, build report (layers on the DLA, timing cache) and validation results.
Use the same options as the service (``engine_*`` settings, ``max_batch_size``) so that it finds the engine.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from retinaedge.runtime.backends.tensorrt.options import BuildOptions

log = logging.getLogger(__name__)


def _batch(text: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch wants MIN,OPT,MAX (e.g. 1,4,4), got {text!r}") from None
    return lo, opt, hi


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="model bundle directory")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    p.add_argument("--dla-core", type=int, default=None, help="DLA core (GPU fallback for other layers)")
    p.add_argument("--batch", type=_batch, default=(1, 4, 4), help="optimization profile MIN,OPT,MAX of N")
    p.add_argument("--workspace-mib", type=int, default=1024, help="builder workspace limit in MiB")
    p.add_argument("--nms", choices=["auto", "plugin", "builtin"], default="auto", help="NMS flavour")
    p.add_argument(
        "--cache-dir", type=Path, default=Path("retinaedge-data/engines"), help="engine cache directory"
    )
    p.add_argument("--cache-max-mib", type=int, default=4096, help="engine cache size budget in MiB")
    p.add_argument(
        "--timing-cache", type=Path, default=None, help="timing cache file (default: in the cache)"
    )
    p.add_argument("--force", action="store_true", help="rebuild even when a valid engine is cached")


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    """The build options the arguments ask for (the defaults equal the service's default settings)."""
    lo, opt, hi = args.batch
    return BuildOptions(
        precision=args.precision,
        dla_core=args.dla_core,
        batch_min=lo,
        batch_opt=opt,
        batch_max=hi,
        workspace_mib=args.workspace_mib,
        nms=args.nms,
        timing_cache=args.timing_cache,
    )


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from retinaedge.runtime.backends.tensorrt.cache import EngineCache
    from retinaedge.runtime.backends.tensorrt.fingerprint import require_trt_extra
    from retinaedge.runtime.backends.tensorrt.loaders import (
        build_validate_store,
        plan_engine,
        timing_cache_path,
    )
    from retinaedge.runtime.backends.tensorrt.planning import default_probe
    from retinaedge.runtime.bundle import load_bundle
    from retinaedge.runtime.errors import RetinaEdgeError
    from retinaedge.runtime.jsonout import emit

    bundle = load_bundle(args.model)
    options = options_from_args(args)
    options.validate()
    require_trt_extra()
    fingerprint, caps = default_probe()
    plan = plan_engine(bundle, options, fingerprint, caps)
    cache = EngineCache(args.cache_dir, args.cache_max_mib * 1024**2)
    if options.timing_cache is None:
        options = replace(options, timing_cache=timing_cache_path(cache.root, fingerprint))
    found = cache.lookup(plan.onnx_sha256, options, fingerprint)
    out: dict[str, Any] = {"fingerprint": fingerprint.to_dict(), "options": options.to_dict()}
    if found.usable and found.entry is not None and not args.force:
        out.update(status="cached", key=found.key, engine=str(found.entry.engine_path))
        out["manifest"] = found.entry.manifest
    else:
        log.info("building: %s", found.reason)
        try:
            backend, manifest = build_validate_store(bundle, options, plan, fingerprint, cache)
        except RetinaEdgeError as exc:  # remembered: start-up will not retry at once
            cache.record_failure(found.key, f"{type(exc).__name__}: {exc}")
            raise
        backend.close()
        out.update(status="built", key=manifest["key"], engine=str(cache.root / manifest["engine_file"]))
        out["manifest"] = manifest
    emit(out)
    return 0
