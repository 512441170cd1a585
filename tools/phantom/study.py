"""A synthetic axial brain MR series: head pose, lesions, slices, intensities and ground-truth boxes.

``make_series(seed)`` is deterministic in its seed. The series is what a scanner would send: ``S``
axial slices of ``rows x cols`` 12-bit pixels (stored as uint16), ordered inferior to superior, with the
DICOM geometry of each slice (Image Position/Orientation (Patient), Pixel Spacing, LPS mm) and, per slice,
the tumours it cuts as boxes in pixel-edge coordinates (x1, y1, x2, y2: columns, rows).

A box is ``difficult`` (scored as neither hit nor miss by ``retinaedge eval``) when the slice cuts only
the end of the tumour: its cross-section is under ``DIFFICULT_AREA_FRACTION`` of the tumour's largest
one in the series or its equivalent diameter is under ``DIFFICULT_DIAMETER_MM``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .anatomy import Head, load_head, lps_to_voxel
from .lesions import KINDS, Lesion, draw, overlaps, sample_lesion

log = logging.getLogger(__name__)

DIFFICULT_AREA_FRACTION = 0.25
DIFFICULT_DIAMETER_MM = 5.0
MAX_VALUE = 4095  # 12 bits stored


@dataclass(frozen=True)
class Box:
    """A tumour cut by one slice: pixel-edge coordinates, class name and whether it is difficult."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    difficult: bool
    lesion: int  # index into SyntheticSeries.lesions

    def to_json(self) -> dict[str, object]:
        return {
            "label": self.label,
            "box": [round(self.x1, 2), round(self.y1, 2), round(self.x2, 2), round(self.y2, 2)],
            "difficult": self.difficult,
            "lesion": self.lesion,
        }


@dataclass(frozen=True)
class Pose:
    """Where the template head sits in the scanner: in-plane rotation, scale and shift (LPS)."""

    angle_deg: float
    scale: float
    shift_mm: np.ndarray

    def to_template(self, points_lps: np.ndarray) -> np.ndarray:
        """Scanner LPS mm ``(..., 3)`` -> template LPS mm."""
        a = np.deg2rad(self.angle_deg)
        rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
        return ((points_lps - self.shift_mm) @ rot) / self.scale  # inverse of p = s R q + t

    def to_scanner(self, points_lps: np.ndarray) -> np.ndarray:
        """Template LPS mm ``(..., 3)`` -> scanner LPS mm (``p = s R q + t``)."""
        a = np.deg2rad(self.angle_deg)
        rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
        return self.scale * (points_lps @ rot.T) + self.shift_mm

    def to_json(self) -> dict[str, object]:
        return {"angle_deg": self.angle_deg, "scale": self.scale, "shift_mm": self.shift_mm.tolist()}


@dataclass
class SyntheticSeries:
    """One axial series. ``pixels`` ``(S, rows, cols)`` uint16; geometry in LPS mm.

    ``positions`` ``(S, 3)``: Image Position (Patient) of each slice's first pixel centre;
    ``orientation`` ``(6,)``: row direction cosines then column direction cosines;
    ``pixel_spacing`` ``(row spacing, column spacing)`` mm; ``boxes[s]``: the boxes on slice ``s``.
    """

    seed: int
    pixels: np.ndarray
    positions: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_thickness: float
    spacing_between_slices: float
    lesions: list[Lesion]
    boxes: list[list[Box]]
    window: tuple[float, float]  # centre, width suggested for display
    pose: Pose

    def lesion_truth(self) -> list[dict[str, object]]:
        """Each lesion with its centre in scanner LPS mm and the slices it appears on."""
        out = []
        for n, lesion in enumerate(self.lesions):
            slices = [s for s, row in enumerate(self.boxes) if any(b.lesion == n for b in row)]
            centre = self.pose.to_scanner(lesion.center_lps)
            out.append(
                {**lesion.to_json(), "center_lps_mm": [round(float(v), 2) for v in centre], "slices": slices}
            )
        return out

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])


def sample_lesions(head: Head, rng: np.random.Generator, p_none: float = 0.15) -> list[Lesion]:
    """0 lesions with probability ``p_none``, else 1-3 of random kinds that do not overlap."""
    if rng.random() < p_none:
        return []
    out: list[Lesion] = []
    for _ in range(int(rng.integers(1, 4))):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        if kind == "pituitary" and any(x.kind == "pituitary" for x in out):
            continue
        for _attempt in range(20):
            cand = sample_lesion(kind, head, rng)
            if not any(overlaps(cand, x) for x in out):
                out.append(cand)
                break
    return out


def _slice_grid(
    position: np.ndarray, orientation: np.ndarray, spacing: tuple[float, float], shape: tuple[int, int]
) -> np.ndarray:
    """LPS mm of every pixel centre of a slice, ``(rows, cols, 3)``."""
    rows, cols = shape
    r = np.arange(rows)[:, None, None] * spacing[0] * orientation[3:][None, None, :]
    c = np.arange(cols)[None, :, None] * spacing[1] * orientation[:3][None, None, :]
    return position[None, None, :] + r + c


def _bias_field(shape: tuple[int, int], rng: np.random.Generator, strength: float) -> np.ndarray:
    """A smooth multiplicative field ``(rows, cols)`` around 1 (coil sensitivity)."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    c = rng.uniform(-1, 1, 5)
    f = c[0] * xx + c[1] * yy + c[2] * xx * yy + c[3] * xx**2 + c[4] * yy**2
    return 1.0 + strength * f / max(float(np.abs(f).max()), 1e-6)


def make_series(
    seed: int,
    *,
    rows: int = 256,
    cols: int = 256,
    fov_mm: float = 240.0,
    z_range_mm: tuple[float, float] = (-52.0, 78.0),
    thickness_mm: float | None = None,
    lesions: list[Lesion] | None = None,
    slice_subset: np.ndarray | str | None = None,
    negatives: int = 3,
) -> SyntheticSeries:
    """Build the series of ``seed`` (see the module docstring).

    ``z_range_mm``: superior-inferior coverage in template z (0 at the anterior commissure);
    ``thickness_mm``: slice thickness = spacing (default: random 3-5 mm); ``slice_subset``: indices of the
    slices to render, ``"lesions"`` for every slice that may cut a lesion plus ``negatives`` others
    (what training needs), ``None`` for all.
    """
    from scipy import ndimage

    head = load_head()
    rng = np.random.default_rng(seed)
    if lesions is None:
        lesions = sample_lesions(head, rng)
    pose = Pose(
        angle_deg=float(rng.uniform(-12.0, 12.0)),
        scale=float(rng.uniform(0.9, 1.1)),
        shift_mm=np.array([rng.uniform(-12, 12), rng.uniform(-12, 12), 0.0]),
    )
    thickness = float(thickness_mm if thickness_mm is not None else rng.choice([3.0, 4.0, 5.0]))
    t1 = head.t1.copy()
    labels = np.zeros(head.shape, np.uint8)
    for n, lesion in enumerate(lesions):
        draw(lesion, head, t1, labels, n + 1)

    spacing = (fov_mm / rows, fov_mm / cols)
    zs = np.arange(z_range_mm[0], z_range_mm[1] + 1e-6, thickness) * pose.scale
    orientation = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    # Image centre on the scanner's isocentre (0, 0) in x, y; z along the series.
    corner = np.array([-(cols - 1) / 2 * spacing[1], -(rows - 1) / 2 * spacing[0]])
    positions = np.array([[corner[0], corner[1], z] for z in zs])
    gain = rng.uniform(5.0, 9.0)  # white matter at roughly 1000-1800 of 4095
    noise_sd = rng.uniform(0.01, 0.03) * head.wm_level * gain
    bias = _bias_field((rows, cols), rng, rng.uniform(0.05, 0.15))
    offsets = np.array([-thickness / 3, 0.0, thickness / 3])  # partial volume across the slab

    if isinstance(slice_subset, str):
        wanted = _lesion_slices(labels, zs / pose.scale, thickness, rng, negatives)
    else:
        wanted = np.arange(len(zs)) if slice_subset is None else np.asarray(slice_subset)
    pixels = np.zeros((len(wanted), rows, cols), np.uint16)
    masks: list[np.ndarray] = []
    for out_index, s in enumerate(wanted):
        acc = np.zeros((rows, cols), np.float32)
        lab = np.zeros((rows, cols), np.uint8)
        for off in offsets:
            grid = _slice_grid(positions[s] + np.array([0.0, 0.0, off]), orientation, spacing, (rows, cols))
            vox = lps_to_voxel(pose.to_template(grid)).reshape(-1, 3).T
            acc += ndimage.map_coordinates(t1, vox, order=1, mode="constant", cval=0.0).reshape(rows, cols)
            lab = np.maximum(
                lab, ndimage.map_coordinates(labels, vox, order=0, mode="constant").reshape(rows, cols)
            )
        signal = acc / len(offsets) * gain * bias
        noisy = np.hypot(
            signal + rng.normal(0, noise_sd, signal.shape), rng.normal(0, noise_sd, signal.shape)
        )
        pixels[out_index] = np.clip(np.round(noisy), 0, MAX_VALUE).astype(np.uint16)
        masks.append(lab)

    boxes = _boxes(masks, lesions, spacing)
    wm_value = head.wm_level * gain
    series = SyntheticSeries(
        seed=seed,
        pixels=pixels,
        positions=positions[wanted],
        orientation=orientation,
        pixel_spacing=spacing,
        slice_thickness=thickness,
        spacing_between_slices=thickness * pose.scale if slice_subset is None else float("nan"),
        lesions=lesions,
        boxes=boxes,
        window=(round(wm_value * 0.75), round(wm_value * 1.6)),
        pose=pose,
    )
    log.debug("series %d: %d slices, %d lesions", seed, len(wanted), len(lesions))
    return series


def _lesion_slices(
    labels: np.ndarray, template_z: np.ndarray, thickness: float, rng: np.random.Generator, negatives: int
) -> np.ndarray:
    """Indices of slices within a slab of any labelled voxel, plus ``negatives`` random others."""
    from .anatomy import ORIGIN_RAS_MM

    ks = np.flatnonzero(labels.any(axis=(0, 1)))
    hit = np.zeros(len(template_z), bool)
    if len(ks):
        z_lo, z_hi = ks.min() + ORIGIN_RAS_MM[2], ks.max() + ORIGIN_RAS_MM[2]
        hit = (template_z >= z_lo - thickness) & (template_z <= z_hi + thickness)
    others = np.flatnonzero(~hit)
    extra = rng.choice(others, size=min(negatives, len(others)), replace=False) if len(others) else []
    return np.sort(np.concatenate([np.flatnonzero(hit), np.asarray(extra, dtype=int)])).astype(int)


def _boxes(masks: list[np.ndarray], lesions: list[Lesion], spacing: tuple[float, float]) -> list[list[Box]]:
    """Per slice, one box per tumour it cuts, with the difficult rule of the module docstring."""
    areas = np.array([[int(np.count_nonzero(m == n + 1)) for n in range(len(lesions))] for m in masks])
    largest = areas.max(axis=0) if len(masks) else np.zeros(len(lesions))
    pixel_mm2 = spacing[0] * spacing[1]
    out: list[list[Box]] = []
    for s, m in enumerate(masks):
        row: list[Box] = []
        for n, lesion in enumerate(lesions):
            if areas[s, n] == 0:
                continue
            rr, cc = np.nonzero(m == n + 1)
            diameter = 2.0 * np.sqrt(areas[s, n] * pixel_mm2 / np.pi)
            difficult = bool(
                areas[s, n] < DIFFICULT_AREA_FRACTION * largest[n] or diameter < DIFFICULT_DIAMETER_MM
            )
            row.append(
                Box(
                    lesion.kind,
                    float(cc.min()),
                    float(rr.min()),
                    float(cc.max() + 1),
                    float(rr.max() + 1),
                    difficult,
                    n,
                )
            )
        out.append(row)
    return out
