"""HTTPS for the service: the certificate and key settings, checked before uvicorn starts.

Beyond loopback the bearer token and the images cross the hospital network. With ``tls_cert_file`` and
``tls_key_file`` set (PEM files, such as Docker secrets under ``/run/secrets``), the service speaks HTTPS
only: a plain HTTP request on that port fails at the TLS handshake. Without them, binding beyond loopback
is allowed (TLS may be terminated by a reverse proxy in front) but logged as a warning at every start.

The certificate's validity is checked at every start (:func:`certificate_problems`): one that has expired,
is not valid yet or expires within :data:`EXPIRY_WARNING_DAYS` days is served all the same, with a
WARNING naming its dates. Not refused: the check reads the wall clock, which on a device may be days off
at boot (a stale real-time clock before NTP corrects it), and refusing would take the service down for a
wrong clock; clients still refuse an expired certificate at their handshake.

A TLS handshake must complete within ``request_header_timeout_s`` of the connection (asyncio's own default
is 60 s): :class:`HandshakeDeadlineLoop` is the event loop ``retinaedge serve`` runs uvicorn on with TLS.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from pathlib import Path
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


#: A certificate expiring within this many days is warned about at start.
EXPIRY_WARNING_DAYS = 30


def certificate_problems(cert_file: Path, now: float | None = None) -> list[str]:
    """What is wrong with the validity of the (first) certificate in ``cert_file`` at ``now`` (seconds
    since the epoch; default: now): expired, not valid yet, or expiring within
    :data:`EXPIRY_WARNING_DAYS` days. Empty when it is fine or its dates cannot be read."""
    try:
        decoded = ssl._ssl._test_decode_cert(str(cert_file))  # type: ignore[attr-defined]
        not_before = ssl.cert_time_to_seconds(decoded["notBefore"])
        not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
    except (OSError, ssl.SSLError, KeyError, ValueError):
        return []
    now = time.time() if now is None else now
    until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(not_after))
    since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(not_before))
    if now >= not_after:
        return [f"the TLS certificate {cert_file} expired on {until}: clients will refuse it; renew it"]
    if now < not_before:
        return [
            f"the TLS certificate {cert_file} is not valid before {since}: clients will refuse it "
            "(or this device's clock is behind)"
        ]
    days = (not_after - now) / 86400
    if days < EXPIRY_WARNING_DAYS:
        return [f"the TLS certificate {cert_file} expires on {until}, in {days:.1f} days: renew it"]
    return []


class HandshakeDeadlineLoop(asyncio.SelectorEventLoop):
    """The asyncio loop whose TLS servers close a connection whose handshake is not complete after
    :attr:`handshake_timeout_s` (``request_header_timeout_s``; set by ``retinaedge serve``)."""

    handshake_timeout_s: float = 10.0

    async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:
        if kwargs.get("ssl") is not None and kwargs.get("ssl_handshake_timeout") is None:
            kwargs["ssl_handshake_timeout"] = self.handshake_timeout_s
        return await super().create_server(*args, **kwargs)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's TLS keyword arguments (checked first by :func:`server_context`), with the handshake
    deadline's event loop; warns about clear text beyond loopback and about the certificate's
    validity."""
    from retinaedge.service.http.addresses import is_loopback

    if server_context(settings) is None:
        if not is_loopback(settings.host):
            log.warning(
                "serving plain HTTP on %s: the bearer token and the images cross the network unencrypted; "
                "set tls_cert_file and tls_key_file, or terminate TLS in a reverse proxy in front",
                settings.host,
            )
        return {}
    assert settings.tls_cert_file is not None
    for problem in certificate_problems(settings.tls_cert_file):
        log.warning("%s", problem)
    HandshakeDeadlineLoop.handshake_timeout_s = settings.request_header_timeout_s
    return {
        "ssl_certfile": str(settings.tls_cert_file),
        "ssl_keyfile": str(settings.tls_key_file),
        "ssl_version": ssl.PROTOCOL_TLS_SERVER,
        "loop": f"{__name__}:HandshakeDeadlineLoop",
    }
