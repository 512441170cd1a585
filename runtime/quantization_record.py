"""``quantization.json``: what ``retinaedge quantize`` (:mod:`retinaedge.export.quantize`) records beside
``model.int8.qdq.onnx``, and the check every INT8 consumer makes of it before using the Q/DQ model.

The record holds the Q/DQ file's ``sha256`` and, when the quantizer ran its accuracy check, ``accuracy``
(``map50`` ``{fp32, int8, drop}`` as fractions 0..1, ``max_ap50_drop``, ``passed``). Reading it needs
nothing but the bundle directory: ``retinaedge build --precision int8`` and the service check it here,
without importing the quantizer (the import direction is service -> runtime, export -> runtime).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from retinaedge.runtime.bundle import QDQ_MODEL_FILE, QUANTIZATION_FILE
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.hashing import sha256_file

log = logging.getLogger(__name__)


def check_recorded_accuracy(root: Path) -> dict[str, Any]:
    """Refuse (:class:`ConfigError`) a Q/DQ model that ``quantization.json`` does not vouch for: no record,
    a sha256 that is not the file's (re-quantized or replaced since), or a recorded accuracy check that
    failed. A model quantized without an accuracy check passes, with a warning. Returns the record."""
    path, record_path = root / QDQ_MODEL_FILE, root / QUANTIZATION_FILE
    if not record_path.is_file():
        raise ConfigError(f"{path.name} has no {QUANTIZATION_FILE}; run `retinaedge quantize` again")
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{record_path} is unreadable: {exc}") from exc
    if record.get("sha256") != sha256_file(path):
        raise ConfigError(f"{path.name} is not the model {QUANTIZATION_FILE} describes (sha256 differs)")
    accuracy = record.get("accuracy")
    if accuracy is None:
        log.warning("%s: AP50 drop never measured (quantized without --annotations/--eval)", path.name)
    elif not accuracy.get("passed"):
        fp32, int8, drop = (accuracy["map50"][k] for k in ("fp32", "int8", "drop"))
        raise ConfigError(
            f"{path.name} failed its accuracy check: mean AP50 {fp32} -> {int8} (drop {drop}, limit "
            f"{accuracy['max_ap50_drop']}); quantize again (another method, more calibration frames, "
            "--keep-float) or build fp16/fp32"
        )
    return dict(record)
