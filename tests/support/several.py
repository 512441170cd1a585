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


def export_demo(root: Path, name: str, *extra: str) -> Path:
    """Export the demo checkpoint as the demo bundle was (the model card's command, without its parity
    DICOM) into ``root/bundle`` with ``retinaedge export`` in-process, under ``name`` and with ``extra``
    arguments; returns the bundle."""
    from retinaedge.runtime.cli import main

    out = root / "bundle"
    status = main(
        [
            "export", str(REPO_ROOT / "models" / "demo_checkpoint.pt"), "--out", str(out),
            "--arch", "mobilenet_v3_fpn64", "--input-size", "256", "--class-names",
            "glioma,meningioma,pituitary", "--channels", "1", "--window", "minmax", "--name", name, *extra,
        ]
    )  # fmt: skip
    assert status == 0, f"the export of {name} failed"
    return out


def export_any_mr(root: Path) -> Path:
    """The second model: another name, MR of any orientation among axial and sagittal."""
    use = root / "intended_use.json"
    use.write_text(json.dumps(ANY_USE))
    return export_demo(root, ANY_NAME, "--intended-use", str(use))
