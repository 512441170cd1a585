"""``retinaedge keygen --out NAME``: a new Ed25519 key pair for signing model bundles.

Writes ``NAME.key.pem`` (the private key, PKCS#8 PEM as ``openssl genpkey -algorithm ed25519`` writes it,
mode 0600: keep it off the devices) and ``NAME.pub.pem`` (the public key, as ``openssl pkey -pubout``
writes it: what a device's ``trusted_keys`` lists), and prints the key's fingerprint. Never overwrites.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="path prefix: NAME.key.pem and NAME.pub.pem")


def run(args: argparse.Namespace) -> int:
    from retinaedge.runtime.jsonout import emit
    from retinaedge.runtime.signing import generate_key_pair

    private = args.out.with_name(args.out.name + ".key.pem")
    public = args.out.with_name(args.out.name + ".pub.pem")
    key = generate_key_pair(private, public)
    emit({"fingerprint": key, "private_key": str(private), "public_key": str(public)})
    return 0
