"""Jetson Linux (L4T) release from ``/etc/nv_tegra_release`` and the JetPack it belongs to.

The first line of ``/etc/nv_tegra_release`` looks like::

    # R36 (release), REVISION: 4.4, GCID: 41062509, BOARD: generic, EABI: aarch64, DATE: Mon Jun 16 ...

which is L4T 36.4.4. Nothing on the device records the JetPack number people quote, so it is looked up
in :data:`JETPACK_BY_L4T`.

JetPack <-> L4T table. Source: NVIDIA JetPack SDK archive (https://developer.nvidia.com/embedded/jetpack-archive)
and the Jetson Linux release pages (https://developer.nvidia.com/embedded/jetson-linux-archive); the
R39.2 -> JetPack 7.2 entry is also stated in jetson_stats' tests (jtop/tests/test_06_tegra_parse.py).

=============  ===========  =====================================================
L4T            JetPack      Modules
=============  ===========  =====================================================
32.5 / 32.5.1  4.5 / 4.5.1  Nano, TX1, TX2, Xavier
32.6.1         4.6          Nano, TX1, TX2, Xavier
32.7.1 - .6    4.6.1 - .6   Nano, TX1, TX2, Xavier
35.1           5.0.2        Xavier, AGX Orin
35.2.1         5.1          Xavier, Orin
35.3.1         5.1.1        Xavier, Orin
35.4.1         5.1.2        Xavier, Orin
35.5.0         5.1.3        Xavier, Orin
35.6.0         5.1.4        Xavier, Orin
35.6.1         5.1.5        Xavier, Orin
36.2           6.0 DP       Orin
36.3           6.0          Orin
36.4.0         6.1          Orin
36.4.3         6.2          Orin (Super modes)
36.4.4         6.2.1        Orin
38.2           7.0          Thor
38.4           7.1          Thor
39.2           7.2          Thor, Orin
=============  ===========  =====================================================

Releases not in the table fall back to the family in :data:`JETPACK_FAMILY` (for example any 35.x is
"5.1.x", any 36.4.x "6.1/6.2", any 38.x "7.x"), so a new point release still gets a useful answer.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Exact L4T version -> JetPack version (see the module docstring for the source).
JETPACK_BY_L4T: dict[str, str] = {
    "32.5.0": "4.5",
    "32.5.1": "4.5.1",
    "32.6.1": "4.6",
    "32.7.1": "4.6.1",
    "32.7.2": "4.6.2",
    "32.7.3": "4.6.3",
    "32.7.4": "4.6.4",
    "32.7.5": "4.6.5",
    "32.7.6": "4.6.6",
    "35.1.0": "5.0.2",
    "35.2.1": "5.1",
    "35.3.1": "5.1.1",
    "35.4.1": "5.1.2",
    "35.5.0": "5.1.3",
    "35.6.0": "5.1.4",
    "35.6.1": "5.1.5",
    "36.2.0": "6.0 DP",
    "36.3.0": "6.0",
    "36.4.0": "6.1",
    "36.4.3": "6.2",
    "36.4.4": "6.2.1",
    "38.2.0": "7.0",
    "38.4.0": "7.1",
    "39.2.0": "7.2",
}

#: L4T prefix -> JetPack family, for releases missing from :data:`JETPACK_BY_L4T` (longest prefix wins).
JETPACK_FAMILY: dict[str, str] = {
    "32": "4.x",
    "32.7": "4.6.x",
    "35": "5.1.x",
    "36.2": "6.0 DP",
    "36.3": "6.0",
    "36.4": "6.1/6.2",
    "38": "7.x",
    "39": "7.x",
}

_RELEASE_RE = re.compile(r"^\s*#?\s*R(\d+)\s*\(release\)\s*,\s*REVISION:\s*([\d.]+)(.*)$", re.MULTILINE)
_FIELD_RE = re.compile(r"\b(GCID|BOARD|EABI|DATE):\s*([^,]+?)\s*(?:,|$)")


@dataclass(frozen=True)
class L4TRelease:
    """An L4T (Jetson Linux) release.

    ``version`` is "major.minor.patch" (``R36`` + ``REVISION: 4.4`` -> "36.4.4"; a one-part revision such
    as ``REVISION: 3`` becomes "36.3.0"). ``jetpack`` is the JetPack version from the table, a family such
    as "5.1.x" when only the family is known, or None.
    """

    version: str
    major: int
    revision: str
    board: str | None
    gcid: str | None
    date: str | None
    jetpack: str | None


def _normalise(major: int, revision: str) -> str:
    parts = [p for p in revision.split(".") if p]
    while len(parts) < 2:
        parts.append("0")
    return ".".join([str(major), *parts[:2]])


def jetpack_for_l4t(version: str) -> str | None:
    """JetPack version for an L4T version such as "36.4.4" (exact, else its family, else None)."""
    parts = version.split(".")
    while len(parts) < 3:
        parts.append("0")
    exact = JETPACK_BY_L4T.get(".".join(parts[:3]))
    if exact is not None:
        return exact
    for n in (2, 1):
        family = JETPACK_FAMILY.get(".".join(parts[:n]))
        if family is not None:
            return family
    return None


def parse_nv_tegra_release(text: str) -> L4TRelease | None:
    """Parse the text of ``/etc/nv_tegra_release``; None when it holds no ``R<n> (release)`` line."""
    match = _RELEASE_RE.search(text)
    if match is None:
        log.debug("no L4T release line in %r", text[:120])
        return None
    major = int(match.group(1))
    revision = match.group(2).strip(".")
    fields = dict(_FIELD_RE.findall(match.group(3)))
    version = _normalise(major, revision)
    return L4TRelease(
        version=version,
        major=major,
        revision=revision,
        board=fields.get("BOARD"),
        gcid=fields.get("GCID"),
        date=fields.get("DATE"),
        jetpack=jetpack_for_l4t(version),
    )
