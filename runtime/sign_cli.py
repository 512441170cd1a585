"""``retinaedge sign BUNDLE --key KEY.pem``: sign a model bundle (:mod:`retinaedge.runtime.signing`).

Writes ``BUNDLE/signature.json``: the sha256 of every file of the bundle and an Ed25519 signature over
them with the private key (PKCS#8 PEM, ``openssl genpkey -algorithm ed25519`` or ``retinaedge keygen``).
The bundle is checked first (its model's sha256 against the manifest), so a broken bundle is not signed.
Sign again after any change to the bundle (``retinaedge intended-use --set``, ``eval
--write-operating-point``, ``quantize``): a device with ``trusted_keys`` refuses a bundle changed after
signing.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="model bundle directory")
    p.add_argument("--key", type=Path, required=True, help="Ed25519 private key, PKCS#8 PEM")


def run(args: argparse.Namespace) -> int:
    from retinaedge.runtime.bundle import load_bundle
    from retinaedge.runtime.jsonout import emit
    from retinaedge.runtime.signing import load_private_key, sign_bundle

    key = load_private_key(args.key)
    load_bundle(args.bundle, trusted=None)  # intact (sha256) before it is vouched for; not yet signed
    doc = sign_bundle(args.bundle, key)
    emit({"bundle": str(args.bundle), "key": doc["key"], "files": len(doc["files"])})
    return 0
