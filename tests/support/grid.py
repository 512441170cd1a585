"""The export-parity grid's exports (tests/export/test_export_parity.py), run in worker processes two at a
time: an export is mostly single-threaded tracing, so two of them use the two cores of the machines the
suite runs on. Each worker exports both sizes of one (architecture, classes) model; parity is numerical,
so running beside another export changes none of its figures."""

from __future__ import annotations

import json
import multiprocessing
import traceback
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

Cell = tuple[str, int, tuple[int, int]]


def bundle_dir(root: Path, cell: Cell) -> Path:
    arch, classes, (h, w) = cell
    return root / f"{arch}-{classes}-{h}x{w}"


def _export_model(arch: str, classes: int, sizes: Sequence[tuple[int, int]], root: str) -> dict[str, Any]:
    """Worker: export the biased ``arch`` model with ``classes`` at each size into ``root``; per cell the
    parity JSON as the exporter returned it, or the error's traceback."""
    import torch
    from retinaedge.export import export_retinanet

    from support.models import biased_retinanet

    torch.set_num_threads(1)  # two workers on two cores
    model = biased_retinanet(arch, classes, seed=classes)
    out: dict[str, Any] = {}
    for size in sizes:
        key = f"{size[0]}x{size[1]}"
        try:
            result = export_retinanet(
                model,
                bundle_dir(Path(root), (arch, classes, size)),
                input_size=size,
                class_names=[f"lesion_{i}" for i in range(classes)],
                architecture=arch,
                synthetic_count=4,
            )
            out[key] = {"parity": json.loads(json.dumps(result.parity))}
        except Exception:  # reported by the cell's own test
            out[key] = {"error": traceback.format_exc()}
    return out


def export_grid(cells: Sequence[Cell], root: Path, workers: int = 2) -> dict[Cell, dict[str, Any]]:
    """Export every cell under ``root`` (``workers`` processes, one task per model); per cell
    ``{"parity": ...}`` or ``{"error": traceback}``."""
    models: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for arch, classes, size in cells:
        models.setdefault((arch, classes), []).append(size)
    context = multiprocessing.get_context("spawn")  # the suite's process has torch and threads already
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {m: pool.submit(_export_model, m[0], m[1], sizes, str(root)) for m, sizes in models.items()}
        done = {m: f.result(timeout=1800) for m, f in futures.items()}
    return {(a, c, s): done[(a, c)][f"{s[0]}x{s[1]}"] for a, c, s in cells}
