"""The calling AEs the C-STORE SCP accepts: ``dimse_allowed_aets`` entries, each an AE title with an
optional host.

An entry is a string: ``"SCANNER1"`` (that AE title from any address) or ``"SCANNER1@10.0.0.5"`` (that AE
title from that IP address only; IPv6 as ``"SCANNER1@fd00::5"``). The host is an IP address as the peer
connects from; names are not resolved. AE titles are compared after stripping the spaces DICOM pads them
with, case-sensitively (PS3.5: the value is significant as sent). An AE title holding ``@`` cannot be
listed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    """One allowed calling AE: its title and, if pinned, its IP address."""

    ae_title: str
    host: str | None = None

    def allows(self, ae_title: str, address: str) -> bool:
        if ae_title.strip() != self.ae_title:
            return False
        return self.host is None or _same_address(self.host, address)


def check_ae_title(value: str, what: str) -> str:
    """``value`` as a valid AE title (PS3.5 Table 6.2-1: 1-16 characters of the default repertoire, no
    backslash or control character, not all spaces), stripped of padding; else ValueError."""
    title = value.strip()
    if not title or len(value.rstrip()) > 16:
        raise ValueError(f"{what} {value!r} must be 1 to 16 characters (not only spaces)")
    if any(not (32 <= ord(c) < 127) or c == "\\" for c in title):
        raise ValueError(f"{what} {value!r} may hold printable ASCII only, no backslash")
    return title


def parse_peer(entry: str) -> Peer:
    """``"AET"`` or ``"AET@ip"`` -> :class:`Peer` (ValueError saying what is wrong)."""
    title, at, host = entry.rpartition("@")
    if not at:
        return Peer(check_ae_title(entry, "allowed AE title"))
    try:
        address = str(ipaddress.ip_address(host.strip().strip("[]")))
    except ValueError:
        raise ValueError(
            f"dimse_allowed_aets entry {entry!r}: {host!r} after '@' is not an IP address "
            "(write AET or AET@ip-address)"
        ) from None
    return Peer(check_ae_title(title, "allowed AE title"), address)


def parse_peers(entries: Iterable[str]) -> tuple[Peer, ...]:
    return tuple(parse_peer(e) for e in entries)


def allowed(peers: tuple[Peer, ...], ae_title: str, address: str) -> bool:
    """Whether a calling AE may associate; an empty list allows every AE (loopback only: settings)."""
    return not peers or any(p.allows(ae_title, address) for p in peers)


def _same_address(a: str, b: str) -> bool:
    try:
        x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return False
    if isinstance(y, ipaddress.IPv6Address) and y.ipv4_mapped is not None:
        y = y.ipv4_mapped  # an IPv4 peer on a dual-stack socket
    return x == y
