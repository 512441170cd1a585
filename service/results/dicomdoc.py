"""What every result document (:mod:`.documents`) shares: its series, its equipment, its identity.

- **Series**: one Series Instance UID per document kind, study and model (:func:`document_series_uid`),
  so that every GSPS the appliance makes for a study is one PR series, every KOS one KO series, and so
  on; a different model makes a different series (the General Equipment module, PS3.3 C.7.5.1, is a
  series' and says which model made it). Each built document is a new SOP instance (a fresh SOP
  Instance UID, ``pydicom.uid.generate_uid``).
- **Equipment**: Manufacturer ``retinaedge``, Manufacturer's Model Name the model's name, Software
  Versions the appliance's version and the model's sha256 prefix, Device Serial Number this appliance's
  (:func:`equipment`; :mod:`.device`).
- **Identity**: the patient and study attributes are copied from the source instance's kept header
  (evidence plus identity file, :mod:`.evidence`); the Type 2 ones a conformant image has but scanners
  and test data sometimes omit are made present and empty (:func:`with_type2`; PS3.3 C.7.1.1, C.7.2.1).
"""

from __future__ import annotations

import copy
import uuid
from typing import TYPE_CHECKING

from retinaedge.runtime import __version__
from retinaedge.service.results.appliance import MANUFACTURER, device_identity

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that documents
#: copy from the source image.
TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def document_series_uid(kind: str, study_uid: str, model_sha256: str) -> str:
    """The Series Instance UID of the documents of ``kind`` in one study made by one model: the same on
    every call and every appliance (a ``2.25`` UID derived from the three, PS3.5 B.2: the integer of a
    name-based UUID, RFC 9562 version 5; pydicom's ``generate_uid(prefix=None)`` would ignore the
    three and return a random one)."""
    name = "/".join(["retinaedge document series", kind, study_uid, model_sha256])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def equipment(model_name: str, model_sha256: str) -> dict[str, str | list[str]]:
    """General Equipment attributes (PS3.3 C.7.5.1) as keyword -> value: the appliance and the model that
    made the document."""
    return {
        "Manufacturer": MANUFACTURER,
        "ManufacturerModelName": model_name[:64],
        "SoftwareVersions": [f"retinaedge {__version__}", f"model sha256 {model_sha256[:16]}"],
        "DeviceSerialNumber": device_identity().serial,
    }


def with_type2(image: Dataset) -> Dataset:
    """A copy of ``image`` with missing Type 2 patient/study attributes (:data:`TYPE2`) present and
    empty."""
    out = copy.deepcopy(image)
    for keyword in TYPE2:
        if keyword not in out:
            setattr(out, keyword, "")
    return out
