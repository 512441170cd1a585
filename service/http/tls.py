"""HTTPS for the service: the certificate and key settings, checked before uvicorn starts.

Beyond loopback the bearer token and the images cross the hospital network. With ``tls_cert_file`` and
``tls_key_file`` set (PEM files, such as Docker secrets under ``/run/secrets``), the service speaks HTTPS
only: a plain HTTP request on that port fails at the TLS handshake. Without them, binding beyond loopback
is allowed (TLS may be terminated by a reverse proxy in front) but logged as a warning at every start.
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING, Any

from retinaedge.runtime.errors import ConfigError

if TYPE_CHECKING:
    from retinaedge.service.settings import Settings

log = logging.getLogger(__name__)


def server_context(settings: Settings, cls: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext | None:
    """The TLS context the settings ask for (TLS 1.2 or newer; an instance of ``cls``), or None for plain
    HTTP.

    Raises :class:`ConfigError` when the certificate or key cannot be read or do not match.
    """
    if settings.tls_cert_file is None:
        return None
    assert settings.tls_key_file is not None  # the settings require both or neither
    ctx = cls(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"TLS certificate {settings.tls_cert_file} and key {settings.tls_key_file} cannot be used: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ) from exc
    return ctx


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's TLS keyword arguments (checked first by :func:`server_context`); warns about clear text
    beyond loopback."""
    from retinaedge.service.http.addresses import is_loopback

    if server_context(settings) is None:
        if not is_loopback(settings.host):
            log.warning(
                "serving plain HTTP on %s: the bearer token and the images cross the network unencrypted; "
                "set tls_cert_file and tls_key_file, or terminate TLS in a reverse proxy in front",
                settings.host,
            )
        return {}
    return {
        "ssl_certfile": str(settings.tls_cert_file),
        "ssl_keyfile": str(settings.tls_key_file),
        "ssl_version": ssl.PROTOCOL_TLS_SERVER,
    }
