"""The head the phantoms are made of: the MNI ICBM152 2009a T1 brain plus synthetic extra-cerebral layers.

The template (nilearn's wheel ships it; see ``NOTICE-MNI-ICBM152.txt``) is a skull-stripped 1 mm
T1-weighted average brain, ``(197, 233, 189)`` voxels indexed ``(i, j, k)`` along RAS ``(x, y, z)`` with
voxel ``(0, 0, 0)`` at RAS ``(-98, -134, -72)`` mm. Around the brain this module adds what a real head
has on a T1 image, by distance outside the brain: a thin CSF layer (dark), the skull's inner table (very
dark), the diploe (marrow, intermediate), the outer table and the scalp (bright fat).

Coordinates: DICOM uses LPS (x to the patient's left, y posterior, z superior); the template is RAS.
:func:`lps_to_voxel` converts.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
WM_FILE = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
ORIGIN_RAS_MM = np.array([-98.0, -134.0, -72.0])
#: Centre of the sella turcica in template RAS mm (below the hypothalamus, in front of the pons).
SELLA_RAS_MM = np.array([0.0, 2.0, -32.0])


def nilearn_data_dir() -> Path:
    """Where nilearn's wheel keeps the template files (raises ImportError naming the extra)."""
    try:
        import nilearn
    except ImportError as exc:  # pragma: no cover - dependency message
        raise ImportError("the phantom generator needs nilearn: pip install -e '.[phantoms]'") from exc
    return Path(nilearn.__file__).parent / "datasets" / "data"


@dataclass(frozen=True)
class Head:
    """Volumes on the template grid (1 mm voxels, RAS axes).

    ``t1``: float32 T1-weighted intensity, brain from the template, extra-cerebral layers synthetic,
    arbitrary units with white matter at ``wm_level``. ``brain``: bool brain mask. ``outside_mm``: float32
    distance outside the brain in mm (0 inside); ``inside_mm`` the distance inside it (0 outside). ``wm``: float32 white-matter probability 0..1.
    """

    t1: np.ndarray
    brain: np.ndarray
    outside_mm: np.ndarray
    inside_mm: np.ndarray
    wm: np.ndarray
    wm_level: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.t1.shape  # type: ignore[return-value]


def lps_to_voxel(points_lps: np.ndarray) -> np.ndarray:
    """``(..., 3)`` LPS mm -> ``(..., 3)`` fractional template voxel indices."""
    ras = points_lps * np.array([-1.0, -1.0, 1.0])
    return ras - ORIGIN_RAS_MM


def voxel_to_lps(voxels: np.ndarray) -> np.ndarray:
    """``(..., 3)`` template voxel indices -> LPS mm."""
    return (voxels + ORIGIN_RAS_MM) * np.array([-1.0, -1.0, 1.0])


def _layers(outside_mm: np.ndarray, wm_level: float, rng: np.random.Generator) -> np.ndarray:
    """Extra-cerebral T1 intensity by distance outside the brain (0 inside the brain)."""
    from scipy import ndimage

    # A smooth +-1.5 mm wobble so the layers are not perfect offsets of the brain surface.
    wobble = ndimage.gaussian_filter(rng.standard_normal(outside_mm.shape).astype(np.float32), 6.0)
    wobble *= 1.5 / max(float(np.abs(wobble).max()), 1e-6)
    d = outside_mm + wobble
    out = np.zeros(outside_mm.shape, np.float32)
    table = [  # (from mm, to mm, fraction of the white-matter level)
        (0.0, 2.5, 0.12),  # CSF
        (2.5, 4.5, 0.05),  # inner table
        (4.5, 6.5, 0.45),  # diploe
        (6.5, 8.0, 0.05),  # outer table
        (8.0, 13.0, 0.85),  # scalp fat
    ]
    for lo, hi, frac in table:
        out[(d > lo) & (d <= hi)] = frac * wm_level
    out[outside_mm <= 0] = 0.0
    return out


@functools.lru_cache(maxsize=1)
def load_head(seed: int = 0) -> Head:
    """Load the template and build the head once per process (about 5 s)."""
    import nibabel as nib
    from scipy import ndimage

    data = nilearn_data_dir()
    t1 = np.asanyarray(nib.load(data / TEMPLATE_FILE).dataobj).astype(np.float32)
    wm = np.asanyarray(nib.load(data / WM_FILE).dataobj).astype(np.float32) / 255.0
    brain = ndimage.binary_fill_holes(t1 > 8.0)
    outside = ndimage.distance_transform_edt(~brain).astype(np.float32)
    inside = ndimage.distance_transform_edt(brain).astype(np.float32)
    wm_level = float(np.median(t1[wm > 0.9]))
    head_t1 = np.where(brain, t1, _layers(outside, wm_level, np.random.default_rng(seed)))
    log.info("head built: %s voxels, white matter level %.1f", t1.shape, wm_level)
    return Head(
        t1=head_t1.astype(np.float32),
        brain=brain,
        outside_mm=outside,
        inside_mm=inside,
        wm=wm,
        wm_level=wm_level,
    )
