"""Signed model bundles: a detached Ed25519 signature over every file of the bundle.

``retinaedge sign BUNDLE --key KEY.pem`` writes ``signature.json`` into the bundle: the sha256 of every
file in it (``manifest.json`` included; subdirectories are refused: a bundle is flat), the signing key's
fingerprint, and an Ed25519 signature over the canonical JSON of those two (sorted keys, no spaces,
UTF-8). ``retinaedge keygen`` makes a key pair. Keys are PEM as OpenSSL writes them: the private key
PKCS#8 (``openssl genpkey -algorithm ed25519``), the public key SubjectPublicKeyInfo (``openssl pkey
-pubout``). The cryptography is the ``cryptography`` package's; nothing here is hand-written beyond
hashing files and encoding JSON.

With trusted keys configured (:func:`load_trusted_keys`: PEM public keys, from a directory or a list of
files), :func:`verify_bundle` accepts a bundle only when ``signature.json`` is there, is signed by one of
them, and every file of the bundle is listed with its sha256, none missing and none added. Anything else
is a :class:`SignatureError` whose one-line message says which (unsigned, tampered with and which file,
signed by an untrusted key, a bad signature) and names the key by its fingerprint and file.

A key's fingerprint is the first 16 hex digits of the sha256 of its raw 32-byte public key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinaedge.runtime.errors import BundleError, ConfigError
from retinaedge.runtime.hashing import sha256_file

log = logging.getLogger(__name__)

SIGNATURE_FILE = "signature.json"
FORMAT = 1


class SignatureError(BundleError):
    """A bundle that must be signed by a trusted key is not (the message says why and names the key)."""

    type = "signature-rejected"


@dataclass(frozen=True)
class TrustedKey:
    """A public key the appliance trusts: its fingerprint, the file it came from and the key itself."""

    fingerprint: str
    source: str
    key: Any  # cryptography's Ed25519PublicKey


def _raw_public(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def fingerprint(public_key: Any) -> str:
    """The key's fingerprint (module docstring)."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def bundle_files(root: Path) -> dict[str, str]:
    """File name -> sha256 of every file of the bundle but ``signature.json`` (a subdirectory or a
    symbolic link is a :class:`SignatureError`: a signed bundle is flat regular files)."""
    out = {}
    for path in sorted(root.iterdir()):
        if path.name == SIGNATURE_FILE:
            continue
        if path.is_symlink() or not path.is_file():
            raise SignatureError(
                f"bundle {root}: {path.name} is not a regular file (a signed bundle is flat)"
            )
        out[path.name] = sha256_file(path)
    return out


# -- keys ---------------------------------------------------------------------------------------------


def generate_key_pair(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 key pair as PEM (PKCS#8 private key, mode 0600; SubjectPublicKeyInfo public key);
    returns its fingerprint. Existing files are not overwritten."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} exists: keygen does not overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public_path.write_bytes(public_pem)
    return fingerprint(key.public_key())


def load_private_key(path: Path) -> Any:
    """An Ed25519 private key from a PEM file (PKCS#8, unencrypted); ConfigError naming the file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"--key {path}: not a readable, unencrypted PEM private key ({type(exc).__name__})"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"--key {path}: an Ed25519 key is needed (openssl genpkey -algorithm ed25519)")
    return key


def load_public_key(path: Path) -> TrustedKey:
    """An Ed25519 public key from a PEM file (``openssl pkey -pubout``); ConfigError naming the file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"trusted key {path}: not a readable PEM public key ({type(exc).__name__})"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"trusted key {path}: not an Ed25519 public key")
    return TrustedKey(fingerprint(key), str(path), key)


def load_trusted_keys(sources: Iterable[Path]) -> list[TrustedKey]:
    """The public keys of ``sources``: PEM files, or directories whose ``*.pem`` files are read (in name
    order). ConfigError when a source is missing or none yields a key."""
    keys: list[TrustedKey] = []
    for source in sources:
        if source.is_dir():
            files = sorted(p for p in source.iterdir() if p.suffix == ".pem" and p.is_file())
            if not files:
                raise ConfigError(f"trusted_keys: {source} holds no .pem public key")
            keys += [load_public_key(p) for p in files]
        elif source.is_file():
            keys.append(load_public_key(source))
        else:
            raise ConfigError(f"trusted_keys: {source} does not exist")
    if not keys:
        raise ConfigError("trusted_keys is set but names no key")
    return keys


# -- signing and verifying ----------------------------------------------------------------------------


def sign_bundle(root: Path, private_key: Any) -> dict[str, Any]:
    """Write ``root/signature.json`` signed with ``private_key``; returns what was written."""
    if not root.is_dir():
        raise ConfigError(f"{root} is not a bundle directory (a bare model.onnx cannot carry a signature)")
    payload = {"format": FORMAT, "key": fingerprint(private_key.public_key()), "files": bundle_files(root)}
    doc = {
        **payload,
        "algorithm": "ed25519",
        "signature": base64.b64encode(private_key.sign(_canonical(payload))).decode(),
    }
    tmp = root / f".{SIGNATURE_FILE}.tmp"
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    tmp.replace(root / SIGNATURE_FILE)
    return doc


def verify_bundle(root: Path | None, trusted: Sequence[TrustedKey], name: str) -> TrustedKey:
    """The trusted key ``root``'s signature verifies with; :class:`SignatureError` otherwise (module
    docstring). ``name`` names the bundle in messages; ``root`` None is a bare ``model.onnx``."""
    from cryptography.exceptions import InvalidSignature

    if root is None:
        raise SignatureError(
            f"{name}: a bare model.onnx cannot be signed; trusted_keys needs a signed bundle"
        )
    path = root / SIGNATURE_FILE
    if not path.is_file():
        raise SignatureError(f"bundle {name} is unsigned (no {SIGNATURE_FILE}); sign it with retinaedge sign")
    try:
        doc = json.loads(path.read_text())
        payload = {"format": doc["format"], "key": str(doc["key"]), "files": dict(doc["files"])}
        signature = base64.b64decode(doc["signature"], validate=True)
    except (OSError, ValueError, KeyError, TypeError):
        raise SignatureError(f"bundle {name}: {SIGNATURE_FILE} is malformed") from None
    key = next((k for k in trusted if k.fingerprint == payload["key"]), None)
    if key is None:
        raise SignatureError(f"bundle {name} is signed by key {payload['key']}, which is not a trusted key")
    try:
        key.key.verify(signature, _canonical(payload))
    except InvalidSignature:
        raise SignatureError(
            f"bundle {name}: its signature does not verify with trusted key {key.fingerprint} ({key.source}): "
            f"{SIGNATURE_FILE} was altered or signed by another key"
        ) from None
    actual = bundle_files(root)
    listed = payload["files"]
    for file in sorted(set(listed) | set(actual)):
        if file not in actual:
            raise SignatureError(
                f"bundle {name} was tampered with: signed file {file} is missing (key {key.fingerprint})"
            )
        if file not in listed:
            raise SignatureError(
                f"bundle {name} was tampered with: {file} was added after signing (key {key.fingerprint})"
            )
        if listed[file] != actual[file]:
            raise SignatureError(
                f"bundle {name} was tampered with: {file} changed after signing (sha256 {actual[file][:12]}..., "
                f"signed {str(listed[file])[:12]}...; key {key.fingerprint})"
            )
    return key


#: The environment variable every verb reads the trusted keys from (the service's setting of that name).
TRUSTED_KEYS_ENV = "RETINAEDGE_TRUSTED_KEYS"


def parse_trusted_keys(value: str | None) -> list[TrustedKey] | None:
    """The ``trusted_keys`` setting: a JSON list of paths, or paths separated by ``os.pathsep`` (a
    directory of ``*.pem`` public keys, or key files); None or empty: signatures are not checked."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"trusted_keys: not a JSON list of paths: {exc}") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError("trusted_keys: a JSON list of paths is expected")
    else:
        items = [p for p in text.split(os.pathsep) if p]
    return load_trusted_keys(Path(i) for i in items)


def trusted_keys_from_environment() -> list[TrustedKey] | None:
    """The keys :data:`TRUSTED_KEYS_ENV` names, or None when it is not set."""
    return parse_trusted_keys(os.environ.get(TRUSTED_KEYS_ENV))
