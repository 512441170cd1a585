"""``retinaedge models ...``: a running appliance's models and their versions, from the device.

A client of the local service's model endpoints (``--url``, default ``http://127.0.0.1:8080``; the token
from ``RETINAEDGE_API_TOKEN`` or ``RETINAEDGE_API_TOKEN_FILE``), so that a change goes through the same
checks and switch as over HTTP:

- ``list``: every model with its state (``GET /v1/models``);
- ``versions NAME``: a model's versions, the active, previous and trialled one, each one's check;
- ``stage DIR``: a bundle directory as a new version of the model its manifest names (it is sent as a
  tar archive, signature checked by the appliance, then loaded and self-tested there);
- ``activate NAME VERSION``, ``rollback NAME``;
- ``shadow NAME VERSION`` starts a silent trial, ``shadow NAME --off`` ends it, ``report NAME`` shows it.

Prints the service's JSON answer; a refusal is its problem document on stdout and exit status 1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from retinaedge.runtime.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8080"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("RETINAEDGE_URL", DEFAULT_URL),
                   help=f"the appliance's HTTP address (default {DEFAULT_URL} or RETINAEDGE_URL)")  # fmt: skip
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="every model with its state")
    sub.add_parser("versions", help="a model's versions").add_argument("name")
    stage = sub.add_parser("stage", help="a bundle directory as a new version (signed where required)")
    stage.add_argument("bundle", type=Path)
    activate = sub.add_parser("activate", help="serve a checked version from now on")
    activate.add_argument("name")
    activate.add_argument("version")
    sub.add_parser("rollback", help="serve the previously active version again").add_argument("name")
    shadow = sub.add_parser("shadow", help="start (VERSION) or end (--off) a silent trial")
    shadow.add_argument("name")
    shadow.add_argument("version", nargs="?")
    shadow.add_argument("--off", action="store_true", help="end the trial")
    sub.add_parser("report", help="how the version on trial agrees with the active one").add_argument("name")


def _token() -> str | None:
    token = os.environ.get("RETINAEDGE_API_TOKEN")
    path = os.environ.get("RETINAEDGE_API_TOKEN_FILE")
    if token is None and path:
        from retinaedge.service.settings import read_token_file

        token = read_token_file(Path(path))
    return token


def _tar(bundle: Path) -> bytes:
    if not bundle.is_dir():
        raise ConfigError(f"{bundle} is not a bundle directory")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for item in sorted(bundle.iterdir()):
            if item.is_file() and not item.is_symlink():
                tar.add(item, arcname=item.name)
    return buf.getvalue()


def _call(url: str, method: str, body: bytes | None = None, media: str | None = None) -> tuple[int, Any]:
    headers = {"Accept": "application/json"}
    token = _token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if media:
        headers["Content-Type"] = media
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=3600) as answer:  # an activation waits for warm-up
            return int(answer.status), json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read() or b"null")
    except urllib.error.URLError as exc:
        raise ConfigError(f"the appliance at {url} cannot be reached ({exc.reason})") from exc


def run(args: argparse.Namespace) -> int:
    from retinaedge.runtime.jsonout import emit

    base = args.url.rstrip("/")
    a = args.action
    if a == "list":
        status, body = _call(f"{base}/v1/models", "GET")
    elif a == "versions":
        status, body = _call(f"{base}/v1/models/{args.name}/versions", "GET")
    elif a == "stage":
        from retinaedge.runtime.manifest import Manifest

        name = Manifest.from_json((args.bundle / "manifest.json").read_text()).name
        status, body = _call(
            f"{base}/v1/models/{name}/versions", "POST", _tar(args.bundle), "application/gzip"
        )
    elif a == "activate":
        status, body = _call(f"{base}/v1/models/{args.name}/activate?version={args.version}", "POST")
    elif a == "rollback":
        status, body = _call(f"{base}/v1/models/{args.name}/rollback", "POST")
    elif a == "shadow":
        if args.off == (args.version is not None):
            raise ConfigError("shadow takes a VERSION to trial, or --off to end the trial")
        if args.off:
            status, body = _call(f"{base}/v1/models/{args.name}/shadow", "DELETE")
        else:
            status, body = _call(f"{base}/v1/models/{args.name}/shadow?version={args.version}", "POST")
    else:
        status, body = _call(f"{base}/v1/models/{args.name}/shadow", "GET")
    emit(body)
    return 0 if status < 400 else 1
