"""Which version of a model the next start will serve, found without changing anything.

``retinaedge boot`` plans each model's backend (a TensorRT engine is built for one ``model.onnx``) before
the service starts, and ``boot --check`` must not write the versions' state. This reads ``state.json``
the way :meth:`~.registry.ModelVersions.seed` decides at start: the settings' bundle when the appliance
has not recorded it as the settings' version (first start, or the site changed the setting), otherwise
the version activated last.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from retinaedge.runtime.bundle import Bundle, load_bundle
from retinaedge.runtime.errors import BundleError
from retinaedge.runtime.signing import TrustedKey
from retinaedge.service.versions.registry import MODELS, STATE_FILE, version_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NextStart:
    """The bundle a start will serve for one model: ``version`` (12 hex digits) and where it comes from,
    ``settings`` (the settings' bundle) or ``activated`` (a version activated since)."""

    bundle: Bundle
    version: str
    source: str


def next_start(data_dir: Path, bundle: Bundle, trusted: Sequence[TrustedKey] | None) -> NextStart:
    """The version the next start serves for the model of ``bundle`` (the settings' bundle); read-only.

    An activated version whose files no longer load (removed, changed in place, signature refused) is
    reported as a :class:`BundleError`, as the start itself would fail on it.
    """
    name = bundle.manifest.name
    configured = version_of(bundle)
    try:
        state = json.loads((data_dir / MODELS / name / STATE_FILE).read_text())
    except FileNotFoundError:
        return NextStart(bundle, configured, "settings")
    except (OSError, ValueError) as exc:
        raise BundleError(f"model {name}: its versions' state cannot be read ({type(exc).__name__})") from exc
    active = state.get("active") if isinstance(state, dict) else None
    if active is None or state.get("settings_version") != configured or active == configured:
        return NextStart(bundle, configured, "settings")
    entry = state.get("versions", {}).get(active)
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise BundleError(f"model {name}: the active version {active} is not recorded with its files")
    served = load_bundle(Path(entry["path"]), trusted=trusted)
    if version_of(served) != active:
        raise BundleError(
            f"model {name}: {entry['path']} holds version {version_of(served)} now, not the active {active}"
        )
    return NextStart(served, active, "activated")
