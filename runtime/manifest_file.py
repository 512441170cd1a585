"""Rewrite a bundle's ``manifest.json`` in place: the sections a site may set after export.

The operating point (``retinaedge eval --write-operating-point``) and the intended use (``retinaedge
intended-use --set``) live in the manifest file only: ``model.onnx``, its sha256 and the manifest embedded
in it are unchanged, and loading the bundle checks the sha256 as before. The file is replaced atomically
(a temporary file renamed over it), so a crash leaves the old manifest or the new one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from retinaedge.runtime.bundle import MANIFEST_FILE
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.manifest import Manifest

log = logging.getLogger(__name__)


def write_manifest(bundle_dir: Path, manifest: Manifest, what: str) -> Path:
    """Write ``manifest`` as ``bundle_dir``'s ``manifest.json``; ``what`` names the change (for errors and
    the log: "operating point", "intended use"). Returns the file written; raises :class:`ConfigError`
    for a bare ``model.onnx`` or a file that cannot be written."""
    if not bundle_dir.is_dir():
        raise ConfigError(
            f"the {what} is written into a bundle directory's manifest.json, not {bundle_dir} (a bare "
            "model.onnx carries its manifest inside)"
        )
    manifest.validate()
    path = bundle_dir / MANIFEST_FILE
    tmp = path.with_name(f".{MANIFEST_FILE}.tmp")
    try:
        tmp.write_text(manifest.to_json() + "\n")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    log.info("%s written to %s", what, path)
    from retinaedge.runtime.signing import SIGNATURE_FILE

    if (bundle_dir / SIGNATURE_FILE).exists():
        log.warning(
            "%s was signed: sign it again (retinaedge sign) or a device with trusted_keys refuses it",
            bundle_dir,
        )
    return path
