"""Who made a result document: this appliance's identity, the same in every document it makes.

The device UID and serial number are derived from the machine's identity (``/etc/machine-id``, the
systemd/D-Bus machine ID, where present; the host name otherwise) with a fixed salt, so they are stable
across restarts and updates of this appliance, differ between appliances, and do not reveal the machine
ID itself. Neither carries patient data.
"""

from __future__ import annotations

import functools
import hashlib
import socket
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import generate_uid

MANUFACTURER = "retinaedge"
MACHINE_ID = Path("/etc/machine-id")


@dataclass(frozen=True)
class DeviceIdentity:
    """``uid``: the Device Observer UID (PS3.16 TID 1004); ``serial``: a Device Serial Number (16
    hexadecimal characters); ``name``: the host name (the Device Observer Name, Station Name)."""

    uid: str
    serial: str
    name: str


@functools.cache
def device_identity() -> DeviceIdentity:
    """This appliance's identity (module docstring), read once per process."""
    try:
        machine = MACHINE_ID.read_text().strip()
    except OSError:
        machine = ""
    name = socket.gethostname() or "retinaedge"
    source = f"retinaedge-device:{machine or name}"
    serial = hashlib.sha256(source.encode()).hexdigest()[:16]
    return DeviceIdentity(uid=generate_uid(entropy_srcs=[source]), serial=serial, name=name[:64])
