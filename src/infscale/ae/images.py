"""Figures regenerated from a bundle against the bundled ones: identical, or within a pixel tolerance.

Fonts, antialiasing and the PNG encoder differ slightly between machines and matplotlib builds, so a regenerated
figure is accepted when its size is the same and at most `max_share` of its pixels differ by more than
`channel_tol` (0–255 scale) in any channel. PNGs are decoded with matplotlib (the figures' own dependency).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

CHANNEL_TOL = 8          # of 255: antialiasing noise
MAX_SHARE = 0.005        # 0.5 % of the pixels


@dataclass
class ImageDiff:
    name: str
    identical: bool
    within: bool
    differing_pixels: int = 0
    pixels: int = 0
    reason: str = ""

    def line(self) -> str:
        if self.identical:
            return f"{self.name}: identical"
        if self.reason:
            return f"{self.name}: DIFFERENT ({self.reason})"
        share = self.differing_pixels / max(1, self.pixels)
        return (f"{self.name}: {'within tolerance' if self.within else 'DIFFERENT'} "
                f"({self.differing_pixels} of {self.pixels} pixels differ, {share:.3%})")


def _read_rgba(path: Path):  # -> numpy.ndarray (H, W, 4) as uint8
    import numpy as np
    from matplotlib import image

    pixels = image.imread(str(path))   # PNGs read as floats in [0, 1]
    if pixels.dtype != np.uint8:
        pixels = np.round(pixels * 255).astype(np.uint8)
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    if pixels.shape[-1] == 3:
        pixels = np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    return pixels


def compare_png(reference: Path, new: Path, channel_tol: int = CHANNEL_TOL, max_share: float = MAX_SHARE) -> ImageDiff:
    """Byte-identical files are identical; otherwise decode both and count the pixels that differ beyond
    `channel_tol` in any channel."""
    import numpy as np

    name = Path(reference).name
    if hashlib.sha256(Path(reference).read_bytes()).digest() == hashlib.sha256(Path(new).read_bytes()).digest():
        return ImageDiff(name, True, True)
    try:
        a, b = _read_rgba(Path(reference)), _read_rgba(Path(new))
    except (OSError, ValueError, SyntaxError) as err:
        return ImageDiff(name, False, False, reason=f"not readable as PNG: {err}")
    if a.shape != b.shape:
        return ImageDiff(name, False, False, reason=f"size {a.shape[1]}×{a.shape[0]} vs {b.shape[1]}×{b.shape[0]}")
    differing = int((np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1) > channel_tol).sum())
    pixels = a.shape[0] * a.shape[1]
    return ImageDiff(name, differing == 0, differing <= max_share * pixels, differing, pixels)
