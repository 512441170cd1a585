"""Container HEALTHCHECK: exit 0 when ``GET /readyz`` answers 200, 1 otherwise.

Standard library only (the images have no curl). Beyond loopback the service answers every path except
``/healthz`` with 401 unless the bearer token is sent (``OPEN_PATHS`` in service/app.py), so the token is
read the way the service gets it: ``RETINAEDGE_API_TOKEN``, else the file named by
``RETINAEDGE_API_TOKEN_FILE`` (a Docker secret; surrounding whitespace stripped), else ``api_token`` in
the JSON file ``RETINAEDGE_CONFIG_FILE``. The port likewise: ``RETINAEDGE_PORT``, else ``port`` in the
config file, else 8080. The probe connects to 127.0.0.1 unless ``RETINAEDGE_HOST`` names another specific
address. With ``tls_cert_file`` set (``RETINAEDGE_TLS_CERT_FILE`` or the config file) the service speaks
HTTPS only, and the probe does too; it does not verify the certificate (the name in it is the device's,
not 127.0.0.1, and the probe only asks its own container whether it is ready). ``/readyz`` is 503 while the model loads, the self-test runs or a TensorRT engine is being
built on first boot; the image's HEALTHCHECK ``--start-period`` covers that.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from typing import Any

WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def _config_file() -> dict[str, Any]:
    path = os.environ.get("RETINAEDGE_CONFIG_FILE")
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            values = json.load(fh)
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def token(env: dict[str, str], config: dict[str, Any]) -> str | None:
    """The bearer token the service was configured with, or None."""
    if env.get("RETINAEDGE_API_TOKEN"):
        return env["RETINAEDGE_API_TOKEN"]
    path = env.get("RETINAEDGE_API_TOKEN_FILE")
    if path:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    value = config.get("api_token")
    return str(value) if value else None


def url(env: dict[str, str], config: dict[str, Any]) -> str:
    host = env.get("RETINAEDGE_HOST") or str(config.get("host", ""))
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = int(env.get("RETINAEDGE_PORT") or config.get("port") or 8080)
    scheme = "https" if tls(env, config) else "http"
    return f"{scheme}://{host}:{port}/readyz"


def tls(env: dict[str, str], config: dict[str, Any]) -> bool:
    """Whether the service was configured for HTTPS (a certificate file is set)."""
    return bool(env.get("RETINAEDGE_TLS_CERT_FILE") or config.get("tls_cert_file"))


def main() -> int:
    env = dict(os.environ)
    config = _config_file()
    request = urllib.request.Request(url(env, config))
    try:
        bearer = token(env, config)
    except OSError as exc:
        print(f"healthcheck: cannot read the API token file: {exc}", file=sys.stderr)
        return 1
    if bearer:
        request.add_header("Authorization", f"Bearer {bearer}")
    context = None
    if tls(env, config):  # its own container on loopback: encrypted, not verified (module docstring)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(request, timeout=4, context=context) as response:
            status = response.status
            body = response.read(2048).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(2048).decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    # docker inspect keeps this output: the reason while not ready (e.g. an engine build in progress).
    print(f"readyz {status}: {body}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
