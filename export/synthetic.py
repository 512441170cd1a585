"""Deterministic synthetic test images for parity checks and the bundle's golden input.

Smooth background fields plus rectangles and ellipses of varied contrast, quantised to 8 bits so the
same float32 tensor (``u8 / 255``) can be stored exactly in the bundle.
"""

from __future__ import annotations

import numpy as np


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """A bilinearly upsampled ``cells x cells`` random grid -> ``(height, width)`` float64 in 0..1."""
    grid = rng.random((cells + 1, cells + 1))
    ys = np.linspace(0, cells, height)
    xs = np.linspace(0, cells, width)
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    g00 = grid[y0][:, x0]
    g01 = grid[y0][:, x0 + 1]
    g10 = grid[y0 + 1][:, x0]
    g11 = grid[y0 + 1][:, x0 + 1]
    return (1 - fy) * ((1 - fx) * g00 + fx * g01) + fy * ((1 - fx) * g10 + fx * g11)


def synthetic_images_u8(count: int, channels: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``(count, channels, height, width)`` uint8 images with structure at many scales."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, channels, height, width), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(count):
        base = 0.6 * _smooth_field(rng, height, width, 6) + 0.25 * _smooth_field(rng, height, width, 24)
        img = np.repeat(base[None], channels, axis=0)
        for _ in range(int(rng.integers(12, 24))):
            h = rng.integers(height // 24, height // 3)
            w = rng.integers(width // 24, width // 3)
            y = rng.integers(0, height - h)
            x = rng.integers(0, width - w)
            value = rng.random(channels)[:, None, None] if channels > 1 else rng.random()
            if rng.random() < 0.5:
                img[:, y : y + h, x : x + w] = value
            else:
                mask = ((yy - y - h / 2) / (h / 2)) ** 2 + ((xx - x - w / 2) / (w / 2)) ** 2 <= 1.0
                img[:, mask] = value if channels == 1 else np.broadcast_to(value, (channels, 1, 1))[:, :, 0]
        img += 0.03 * rng.standard_normal(img.shape)
        out[i] = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return out


def to_float(images_u8: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in 0..1 (``u8 / 255``), the model input convention."""
    return (images_u8.astype(np.float32) / np.float32(255.0)).astype(np.float32)
