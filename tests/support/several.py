"""A second model for tests of several models per appliance: the demo checkpoint exported again, in-process
(no parity DICOM), under another name and with another intended use (MR of any orientation among axial
and sagittal)."""

from __future__ import annotations

import json
from pathlib import Path

from support.paths import REPO_ROOT

ANY_NAME = "retinaedge-demo-anymr"
ANY_USE = {
    "modalities": {"allow": ["MR"], "missing": "reject"},
    "orientation": {"allow": ["axial", "sagittal"], "tolerance_deg": 15, "missing": "accept"},
}


def export_any_mr(root: Path) -> Path:
    """Export the bundle into ``root/bundle`` with ``retinaedge export`` (in-process); returns it."""
    from retinaedge.runtime.cli import main

    use = root / "intended_use.json"
    use.write_text(json.dumps(ANY_USE))
    out = root / "bundle"
    status = main(
        [
            "export", str(REPO_ROOT / "models" / "demo_checkpoint.pt"), "--out", str(out),
            "--arch", "mobilenet_v3_fpn64", "--input-size", "256", "--class-names",
            "glioma,meningioma,pituitary", "--channels", "1", "--window", "minmax", "--name", ANY_NAME,
            "--intended-use", str(use),
        ]
    )  # fmt: skip
    assert status == 0, "the second model's export failed"
    return out
