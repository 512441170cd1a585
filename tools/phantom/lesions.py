"""Three kinds of synthetic brain tumour, placed and drawn into a :class:`~anatomy.Head` volume.

Named after the classes people use for brain MRI tumour detection; the look is that of a
post-contrast T1-weighted image, simplified:

- ``glioma``: intra-axial, in deep white matter; an irregular mass, usually with an enhancing rim
  around a dark necrotic core (otherwise a hypointense, patchily enhancing solid mass), inside a band of
  hypointense oedema. Radii 7-22 mm.
- ``meningioma``: extra-axial, dural-based on the convexity or beside the falx; a smooth homogeneously
  enhancing mass flattened against the skull's inner table, indenting the brain. Radii 6-18 mm.
- ``pituitary``: sellar, on the midline below the hypothalamus, growing upwards; homogeneously
  enhancing, sometimes with a cystic centre. Radii 5-12 mm.

Every lesion is an ellipsoid in template voxel space (1 mm, RAS axes) with a random orientation and,
for gliomas, a perturbed surface. The ground truth is the tumour itself (oedema excluded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import ORIGIN_RAS_MM, SELLA_RAS_MM, Head, voxel_to_lps

KINDS: tuple[str, ...] = ("glioma", "meningioma", "pituitary")


@dataclass(frozen=True)
class Lesion:
    """One tumour: ``center`` in template voxels ``(3,)``, ``radii`` in mm ``(3,)``, ``rotation`` ``(3, 3)``."""

    kind: str
    center: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray
    contrast: float  # enhancement, as a fraction of the white-matter level
    variant: str  # "ring" | "solid" | "cystic" | "plain"
    seed: int

    @property
    def center_lps(self) -> np.ndarray:
        """Centre in template LPS mm (before the study's head pose)."""
        return voxel_to_lps(self.center)

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "variant": self.variant,
            "center_template_lps_mm": [round(float(v), 2) for v in self.center_lps],
            "radii_mm": [round(float(v), 2) for v in self.radii],
        }


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation matrix ``(3, 3)``."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _pick(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(mask)
    return np.array(np.unravel_index(idx[rng.integers(len(idx))], mask.shape), dtype=np.float64)


def sample_lesion(kind: str, head: Head, rng: np.random.Generator) -> Lesion:
    """Draw one lesion of ``kind`` at a plausible place for it."""
    rot = random_rotation(rng)
    seed = int(rng.integers(2**31))
    if kind == "glioma":
        radii = rng.uniform(7.0, 22.0) * rng.uniform(0.75, 1.0, 3)
        # Deep white matter, far enough inside the brain for most of the mass.
        deep = (head.wm > 0.6) & (head.outside_mm == 0)
        center = _pick(rng, deep & (head.inside_mm >= float(radii.min()) * 0.6))
        variant = "ring" if rng.random() < 0.7 else "solid"
        return Lesion(kind, center, radii, rot, rng.uniform(0.3, 0.55), variant, seed)
    if kind == "meningioma":
        r = rng.uniform(6.0, 18.0)
        # A point on the brain surface above the skull base (convexity, parasagittal).
        z_mm = np.arange(head.shape[2]) + ORIGIN_RAS_MM[2]
        surface = (head.outside_mm > 0) & (head.outside_mm <= 1.0)
        surface &= (z_mm > -5.0)[None, None, :]
        center = _pick(rng, surface)
        normal = _outward_normal(head, center)
        # Flattened along the surface normal, centred a little outside the brain surface.
        radii = np.array([r * rng.uniform(0.55, 0.8), r * rng.uniform(0.85, 1.1), r * rng.uniform(0.85, 1.1)])
        t1 = np.cross(normal, [0.0, 0.0, 1.0] if abs(normal[2]) < 0.9 else [1.0, 0.0, 0.0])
        t1 /= np.linalg.norm(t1)
        rot = np.stack([normal, t1, np.cross(normal, t1)], axis=1)
        center = center + normal * radii[0] * 0.15
        return Lesion(kind, center, radii, rot, rng.uniform(0.3, 0.5), "plain", seed)
    if kind == "pituitary":
        size = rng.uniform(5.0, 12.0)
        radii = np.array(
            [size * rng.uniform(0.9, 1.1), size * rng.uniform(0.75, 0.95), size * rng.uniform(1.0, 1.3)]
        )
        center_ras = SELLA_RAS_MM + rng.uniform(-2.0, 2.0, 3) + np.array([0.0, 0.0, 0.35 * radii[2]])
        small = np.eye(3)
        variant = "cystic" if rng.random() < 0.2 else "plain"
        return Lesion(kind, center_ras - ORIGIN_RAS_MM, radii, small, rng.uniform(0.15, 0.35), variant, seed)
    raise ValueError(f"unknown lesion kind {kind!r}; choose one of {KINDS}")


def _outward_normal(head: Head, point: np.ndarray) -> np.ndarray:
    """Unit vector pointing out of the brain at ``point`` (gradient of the distance map)."""
    i, j, k = (int(round(v)) for v in point)
    sl = head.outside_mm[i - 3 : i + 4, j - 3 : j + 4, k - 3 : k + 4]
    g = np.array([np.mean(np.gradient(sl, axis=a)) for a in range(3)])
    n = np.linalg.norm(g)
    return g / n if n > 1e-6 else np.array([0.0, 0.0, 1.0])


def overlaps(a: Lesion, b: Lesion, margin_mm: float = 6.0) -> bool:
    """Conservative test: bounding spheres (plus oedema) closer than ``margin_mm``."""
    reach = lambda x: float(x.radii.max()) * (1.5 if x.kind == "glioma" else 1.0)  # noqa: E731
    return float(np.linalg.norm(a.center - b.center)) < reach(a) + reach(b) + margin_mm


def draw(lesion: Lesion, head: Head, t1: np.ndarray, labels: np.ndarray, label: int) -> None:
    """Draw ``lesion`` into the ``t1`` volume (float32, modified in place) and ``labels`` (uint8 ids).

    Works on the lesion's bounding box only. ``labels`` gets ``label`` where the tumour is (not oedema).
    """
    from scipy import ndimage

    rng = np.random.default_rng(lesion.seed)
    reach = float(lesion.radii.max()) * (1.6 if lesion.kind == "glioma" else 1.05) + 2.0
    lo = np.maximum(np.floor(lesion.center - reach).astype(int), 0)
    hi = np.minimum(np.ceil(lesion.center + reach).astype(int) + 1, np.array(head.shape))
    grid = np.stack(
        np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), axis=-1
    )
    local = (grid - lesion.center) @ lesion.rotation  # coordinates along the lesion's axes, mm
    rho = np.sqrt(np.sum((local / lesion.radii) ** 2, axis=-1))  # 1 on the surface
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    region = t1[box]
    texture = ndimage.gaussian_filter(rng.standard_normal(rho.shape).astype(np.float32), 1.5)
    texture /= max(float(texture.std()), 1e-6)
    wm = head.wm_level
    if lesion.kind == "glioma":
        bumps = ndimage.gaussian_filter(rng.standard_normal(rho.shape).astype(np.float32), 4.0)
        bumps /= max(float(np.abs(bumps).max()), 1e-6)
        rho = rho * (1.0 + 0.22 * bumps)
        tumour = rho < 1.0
        oedema = (rho >= 1.0) & (rho < rng.uniform(1.25, 1.55)) & head.brain[box]
        region[oedema] *= rng.uniform(0.65, 0.8)
        if lesion.variant == "ring":
            rim = tumour & (rho > rng.uniform(0.6, 0.78))
            core = tumour & ~rim
            region[rim] = wm * (1.0 + lesion.contrast) * (1.0 + 0.06 * texture[rim])
            region[core] = wm * rng.uniform(0.2, 0.35) * (1.0 + 0.15 * texture[core])
        else:
            patch = texture > 1.0
            region[tumour] = wm * rng.uniform(0.5, 0.65) * (1.0 + 0.1 * texture[tumour])
            region[tumour & patch] = wm * (1.0 + lesion.contrast)
    else:
        tumour = rho < 1.0
        if lesion.kind == "meningioma":
            tumour &= head.outside_mm[box] <= 2.5  # stops at the skull's inner table
        region[tumour] = wm * (1.0 + lesion.contrast) * (1.0 + 0.04 * texture[tumour])
        if lesion.variant == "cystic":
            cyst = rho < rng.uniform(0.35, 0.55)
            region[cyst] = wm * 0.25
    labels[box][tumour] = label
