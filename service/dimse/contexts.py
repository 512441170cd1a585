"""What the C-STORE SCP accepts: image storage SOP classes in the transfer syntaxes the runtime decodes.

The SOP classes are the storage classes whose IOD carries integer Pixel Data (7FE0,0010) that
:mod:`retinaedge.runtime.dicomio` reads (1 or 3 samples, monochrome, palette, RGB or YBR). Not accepted:
non-image objects (SR, presentation states, waveforms, encapsulated documents, RT plans and structure
sets, raw data, registrations, meshes, measurements), float pixel data (parametric and height maps) and
video (MPEG/HEVC transfer syntaxes). A proposal of any of these is refused at negotiation (abstract
syntax not supported), so the peer's C-STORE never starts; an instance whose class is accepted but
holds no image still gets a 0122 status from the header checks.

The transfer syntaxes are those pydicom can decode here (:func:`transfer_syntaxes` asks its decoders, so
an uninstalled plugin takes its syntax off the list). A compressed instance is stored as received. Within
one proposed presentation context the acceptor's order decides: uncompressed first, then lossless
compression, then lossy, so a peer offering a choice is never asked to compress lossily.
"""

from __future__ import annotations

from typing import Any

VERIFICATION = "1.2.840.10008.1.1"

#: (SOP Class UID, name) of every storage class accepted, in UID order.
IMAGE_STORAGE: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.5.1.4.1.1.1", "Computed Radiography Image"),
    ("1.2.840.10008.5.1.4.1.1.1.1", "Digital X-Ray Image - For Presentation"),
    ("1.2.840.10008.5.1.4.1.1.1.1.1", "Digital X-Ray Image - For Processing"),
    ("1.2.840.10008.5.1.4.1.1.1.2", "Digital Mammography X-Ray Image - For Presentation"),
    ("1.2.840.10008.5.1.4.1.1.1.2.1", "Digital Mammography X-Ray Image - For Processing"),
    ("1.2.840.10008.5.1.4.1.1.1.3", "Digital Intra-Oral X-Ray Image - For Presentation"),
    ("1.2.840.10008.5.1.4.1.1.1.3.1", "Digital Intra-Oral X-Ray Image - For Processing"),
    ("1.2.840.10008.5.1.4.1.1.12.1", "X-Ray Angiographic Image"),
    ("1.2.840.10008.5.1.4.1.1.12.1.1", "Enhanced XA Image"),
    ("1.2.840.10008.5.1.4.1.1.12.2", "X-Ray Radiofluoroscopic Image"),
    ("1.2.840.10008.5.1.4.1.1.12.2.1", "Enhanced XRF Image"),
    ("1.2.840.10008.5.1.4.1.1.128", "Positron Emission Tomography Image"),
    ("1.2.840.10008.5.1.4.1.1.128.1", "Legacy Converted Enhanced PET Image"),
    ("1.2.840.10008.5.1.4.1.1.13.1.1", "X-Ray 3D Angiographic Image"),
    ("1.2.840.10008.5.1.4.1.1.13.1.2", "X-Ray 3D Craniofacial Image"),
    ("1.2.840.10008.5.1.4.1.1.13.1.3", "Breast Tomosynthesis Image"),
    ("1.2.840.10008.5.1.4.1.1.13.1.4", "Breast Projection X-Ray Image - For Presentation"),
    ("1.2.840.10008.5.1.4.1.1.13.1.5", "Breast Projection X-Ray Image - For Processing"),
    ("1.2.840.10008.5.1.4.1.1.130", "Enhanced PET Image"),
    ("1.2.840.10008.5.1.4.1.1.14.1", "Intravascular OCT Image - For Presentation"),
    ("1.2.840.10008.5.1.4.1.1.14.2", "Intravascular OCT Image - For Processing"),
    ("1.2.840.10008.5.1.4.1.1.2", "CT Image"),
    ("1.2.840.10008.5.1.4.1.1.2.1", "Enhanced CT Image"),
    ("1.2.840.10008.5.1.4.1.1.2.2", "Legacy Converted Enhanced CT Image"),
    ("1.2.840.10008.5.1.4.1.1.20", "Nuclear Medicine Image"),
    ("1.2.840.10008.5.1.4.1.1.3.1", "Ultrasound Multi-frame Image"),
    ("1.2.840.10008.5.1.4.1.1.4", "MR Image"),
    ("1.2.840.10008.5.1.4.1.1.4.1", "Enhanced MR Image"),
    ("1.2.840.10008.5.1.4.1.1.4.3", "Enhanced MR Color Image"),
    ("1.2.840.10008.5.1.4.1.1.4.4", "Legacy Converted Enhanced MR Image"),
    ("1.2.840.10008.5.1.4.1.1.481.1", "RT Image"),
    ("1.2.840.10008.5.1.4.1.1.481.2", "RT Dose"),
    ("1.2.840.10008.5.1.4.1.1.481.23", "Enhanced RT Image"),
    ("1.2.840.10008.5.1.4.1.1.481.24", "Enhanced Continuous RT Image"),
    ("1.2.840.10008.5.1.4.1.1.6.1", "Ultrasound Image"),
    ("1.2.840.10008.5.1.4.1.1.6.2", "Enhanced US Volume"),
    ("1.2.840.10008.5.1.4.1.1.6.3", "Photoacoustic Image"),
    ("1.2.840.10008.5.1.4.1.1.66.4", "Segmentation"),
    ("1.2.840.10008.5.1.4.1.1.66.7", "Label Map Segmentation"),
    ("1.2.840.10008.5.1.4.1.1.7", "Secondary Capture Image"),
    ("1.2.840.10008.5.1.4.1.1.7.1", "Multi-frame Single Bit Secondary Capture Image"),
    ("1.2.840.10008.5.1.4.1.1.7.2", "Multi-frame Grayscale Byte Secondary Capture Image"),
    ("1.2.840.10008.5.1.4.1.1.7.3", "Multi-frame Grayscale Word Secondary Capture Image"),
    ("1.2.840.10008.5.1.4.1.1.7.4", "Multi-frame True Color Secondary Capture Image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.1", "VL Endoscopic Image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.2", "VL Microscopic Image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.3", "VL Slide-Coordinates Microscopic Image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.4", "VL Photographic Image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.5.1", "Ophthalmic Photography 8 Bit Image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.5.2", "Ophthalmic Photography 16 Bit Image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.5.4", "Ophthalmic Tomography Image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.5.5", "Wide Field Ophthalmic Photography Stereographic Projection Image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.5.6", "Wide Field Ophthalmic Photography 3D Coordinates Image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.5.7", "Ophthalmic OCT En Face Image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.5.8", "Ophthalmic OCT B-scan Volume Analysis"),
    ("1.2.840.10008.5.1.4.1.1.77.1.6", "VL Whole Slide Microscopy Image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.7", "Dermoscopic Photography Image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.8", "Confocal Microscopy Image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.9", "Confocal Microscopy Tiled Pyramidal Image"),
    ("1.2.840.10008.5.1.4.1.1.81.1", "Ophthalmic Thickness Map"),
    ("1.2.840.10008.5.1.4.1.1.82.1", "Corneal Topography Map"),
)

#: Candidate transfer syntaxes in the acceptor's order of preference (module docstring).
CANDIDATE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 (lossless only)
    "1.2.840.10008.1.2.4.201",  # HTJ2K (lossless only)
    "1.2.840.10008.1.2.4.202",  # HTJ2K with RPCL options (lossless only)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
)


def transfer_syntaxes() -> list[str]:
    """The candidates whose pydicom pixel decoder is available in this installation, in order."""
    from pydicom.pixels.decoders.base import get_decoder

    available = []
    for uid in CANDIDATE_TRANSFER_SYNTAXES:
        try:
            if get_decoder(uid).is_available:
                available.append(uid)
        except NotImplementedError:
            continue
    return available


def supported_contexts() -> list[Any]:
    """pynetdicom presentation contexts: Verification, and each image storage class x
    :func:`transfer_syntaxes`."""
    from pynetdicom.presentation import build_context

    syntaxes = transfer_syntaxes()
    contexts = [build_context(VERIFICATION, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])]
    contexts += [build_context(uid, syntaxes) for uid, _ in IMAGE_STORAGE]
    return contexts
