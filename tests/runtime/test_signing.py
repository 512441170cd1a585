"""Signed bundles (runtime/signing.py): keys from ``retinaedge keygen`` and from OpenSSL itself, a bundle
signed and verified, and each way a bundle is refused with trusted keys (unsigned, one byte of
``model.onnx`` changed, a file added, signed by an untrusted key, an altered signature) by ``detect``,
``boot --check`` and the service."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from retinaedge.runtime.bundle import load_bundle
from retinaedge.runtime.cli import main
from retinaedge.runtime.errors import ConfigError
from retinaedge.runtime.signing import (
    SIGNATURE_FILE,
    SignatureError,
    load_trusted_keys,
    parse_trusted_keys,
)
from support.paths import DEMO, EXAMPLES

OPENSSL = shutil.which("openssl")
IMAGE = str(EXAMPLES / "study_01" / "IM0015.dcm")


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, object]]]:
    code = main(["--log-level", "WARNING", *argv])
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.fixture()
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    """Two key pairs from ``retinaedge keygen``: ``site`` (trusted) and ``other`` (not)."""
    out = {}
    for name in ("site", "other"):
        code, (made,) = cli(capsys, "keygen", "--out", str(tmp_path / name))
        assert code == 0 and len(str(made["fingerprint"])) == 16
        out[name], out[f"{name}.pub"] = Path(str(made["private_key"])), Path(str(made["public_key"]))
    assert (out["site"].stat().st_mode & 0o777) == 0o600
    return out


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    copy = tmp_path / "demo"
    shutil.copytree(DEMO, copy)
    return copy


def test_a_signed_bundle_loads_and_every_tampering_is_refused_naming_the_key(
    bundle: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    trusted = load_trusted_keys([keys["site.pub"]])
    with pytest.raises(SignatureError, match="is unsigned"):
        load_bundle(bundle, trusted=trusted)
    code, (signed,) = cli(capsys, "sign", str(bundle), "--key", str(keys["site"]))
    assert code == 0 and signed["key"] == trusted[0].fingerprint
    assert load_bundle(bundle, trusted=trusted).manifest.name == "retinaedge-demo-brainmr"
    assert load_bundle(bundle, trusted=None)  # without trusted keys nothing is checked

    # Signed by a key the device does not trust.
    other = load_trusted_keys([keys["other.pub"]])
    with pytest.raises(
        SignatureError, match=f"signed by key {trusted[0].fingerprint}, which is not a trusted"
    ):
        load_bundle(bundle, trusted=other)

    # One byte of model.onnx changed (the manifest's sha256 is made to match, as an attacker would).
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tampered / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(SignatureError) as info:
        load_bundle(tampered, trusted=trusted)
    assert "model.onnx changed after signing" in str(info.value) and trusted[0].fingerprint in str(info.value)
    assert "\n" not in str(info.value)

    # A file added after signing (a quantized model the service would prefer, say).
    added = tmp_path / "added"
    shutil.copytree(bundle, added)
    (added / "model.int8.qdq.onnx").write_bytes(b"not a model")
    with pytest.raises(SignatureError, match="model.int8.qdq.onnx was added after signing"):
        load_bundle(added, trusted=trusted)

    # The signature itself altered.
    forged = tmp_path / "forged"
    shutil.copytree(bundle, forged)
    doc = json.loads((forged / SIGNATURE_FILE).read_text())
    doc["files"]["golden.json"] = "0" * 64
    (forged / SIGNATURE_FILE).write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="does not verify with trusted key"):
        load_bundle(forged, trusted=trusted)


def test_detect_and_boot_check_refuse_a_tampered_bundle_through_the_setting(
    bundle: Path,
    keys: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    assert cli(capsys, "sign", str(bundle), "--key", str(keys["site"]))[0] == 0
    keydir = tmp_path / "trusted"
    keydir.mkdir()
    shutil.copy(keys["site.pub"], keydir / "site.pem")
    monkeypatch.setenv("RETINAEDGE_TRUSTED_KEYS", str(keydir))
    code, lines = cli(capsys, "detect", "--model", str(bundle), IMAGE)
    assert code == 0 and "frames" in lines[0]
    (bundle / "golden.json").write_text((bundle / "golden.json").read_text() + " ")
    code, lines = cli(capsys, "detect", "--model", str(bundle), IMAGE)
    assert code == 1 and lines[-1]["error"]["type"] == "signature-rejected"  # type: ignore[index]
    assert "golden.json changed after signing" in lines[-1]["error"]["message"]  # type: ignore[index]
    monkeypatch.setenv("RETINAEDGE_DATA_DIR", str(tmp_path / "data"))
    code = main(
        [
            "--log-level",
            "WARNING",
            "boot",
            "--check",
            "--model",
            str(bundle),
        ]
    )
    out = capsys.readouterr().out
    assert code != 0 and "golden.json changed after signing" in out


@pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")
def test_keys_made_by_openssl_sign_and_verify(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = tmp_path / "ossl.key.pem", tmp_path / "ossl.pub.pem"
    subprocess.run([str(OPENSSL), "genpkey", "-algorithm", "ed25519", "-out", str(private)], check=True)
    subprocess.run([str(OPENSSL), "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True)
    assert cli(capsys, "sign", str(bundle), "--key", str(private))[0] == 0
    assert load_bundle(bundle, trusted=load_trusted_keys([public]))
    rsa = tmp_path / "rsa.pem"
    subprocess.run(
        [str(OPENSSL), "genpkey", "-algorithm", "rsa", "-out", str(rsa)], check=True, capture_output=True
    )
    code, lines = cli(capsys, "sign", str(bundle), "--key", str(rsa))
    assert code == 2 and "an Ed25519 key is needed" in lines[-1]["error"]["message"]  # type: ignore[index]


def test_the_setting_names_files_directories_or_a_json_list(keys: dict[str, Path], tmp_path: Path) -> None:
    assert parse_trusted_keys(None) is None and parse_trusted_keys(" ") is None
    both = parse_trusted_keys(f"{keys['site.pub']}:{keys['other.pub']}")
    assert both is not None and len(both) == 2
    listed = parse_trusted_keys(json.dumps([str(keys["site.pub"])]))
    assert listed is not None and listed[0].source == str(keys["site.pub"])
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad, message in [
        (str(tmp_path / "absent"), "does not exist"),
        (str(empty), "holds no .pem public key"),
        (str(keys["site"]), "not a readable PEM public key"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_trusted_keys(bad)


def test_the_service_starts_only_with_a_verified_bundle(
    bundle: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from retinaedge.service.app import create_app
    from retinaedge.service.settings import load_settings

    assert cli(capsys, "sign", str(bundle), "--key", str(keys["site"]))[0] == 0
    settings = load_settings(model=bundle, data_dir=tmp_path / "data", trusted_keys=str(keys["site.pub"]))
    assert create_app(settings).state.services.bundle.root == bundle
    untrusted = load_settings(model=bundle, data_dir=tmp_path / "data2", trusted_keys=str(keys["other.pub"]))
    with pytest.raises(SignatureError, match="which is not a trusted key"):
        create_app(untrusted)
