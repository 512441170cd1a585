"""``retinaedge intended-use --model DIR [--set FILE | --clear]``: show or set a bundle's intended use.

Without ``--set``/``--clear`` it prints the bundle's ``intended_use`` section as JSON (``null``: the model
takes every image). ``--set FILE`` checks the file (:mod:`retinaedge.runtime.intended_use`) and writes it
into the bundle's ``manifest.json``; ``--clear`` removes it. ``model.onnx`` and its sha256 are unchanged
(:mod:`retinaedge.runtime.manifest_file`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.intended_use import IntendedUse

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="model bundle directory")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--set", type=Path, metavar="FILE", help="JSON of the intended_use section to write")
    what.add_argument("--clear", action="store_true", help="remove the section: the model takes every image")


def read_intended_use(path: Path, flag: str) -> IntendedUse:
    """The intended use in a JSON file, checked; ConfigError naming ``flag`` and the file."""
    try:
        return IntendedUse.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, ConfigError) as exc:
        raise ConfigError(f"{flag} {path}: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    from retinaedge.runtime.bundle import load_bundle
    from retinaedge.runtime.jsonout import emit
    from retinaedge.runtime.manifest_file import write_manifest

    manifest = load_bundle(args.model).manifest
    if args.set is not None or args.clear:
        use = None if args.clear else read_intended_use(args.set, "--set")
        manifest = manifest.with_intended_use(use)
        write_manifest(args.model, manifest, "intended use")
    use = manifest.intended_use
    emit({"model": manifest.name, "intended_use": use.to_dict() if use is not None else None})
    return 0
