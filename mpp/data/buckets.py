"""Aspect-ratio buckets: which frame sizes a dataset is prepared at, which one an image goes to,
and how an image and its boxes are fitted to it (DESIGN.md section 2).

A bucket is a (width, height) in pixels with both sides multiples of `UNIT` = 16: the VAE's
downsampling (8 for FLUX's AutoencoderKL and for the toy world's 8-px patch codec) times the 2×2
latent packing of the transformer, so that every bucket is a whole grid of image tokens. From a
resolution R and a list of aspect ratios a, each bucket has about R² pixels:
width = round(R·√a / 16)·16, height = round(R / √a / 16)·16, with a portrait twin (height and width
swapped) for each a > 1. At R = 1024 the default ratios give 1024×1024, 1184×880 (4:3),
1360×768 (16:9), 1584×656 (2.39:1) and their twins; at the toy's R = 128: 128×128, 144×112,
176×96 and 192×80. An explicit list of sizes replaces the generated one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

UNIT = 16  # pixels: VAE downsampling 8 × 2×2 packing
MIN_VISIBLE = 0.02  # a box keeping less than this share of its area in the frame has left it


@dataclass
class Buckets:
    """The frame sizes a dataset is prepared at (`mpp prepare --buckets.*`).

    Args:
        aspect_ratios: width/height of each landscape bucket (≥ 1), at about resolution² pixels;
            default square, 4:3, 16:9 and 2.39:1. `[1.0]` prepares squares only.
        portrait: add the portrait twin (height × width) of each landscape bucket.
        sizes: explicit [width, height] pairs (multiples of 16) instead of generated ones.
    """

    aspect_ratios: list[float] = field(default_factory=lambda: [1.0, 4 / 3, 16 / 9, 2.39])
    portrait: bool = True
    sizes: list[tuple[int, int]] | None = None

    def resolve(self, resolution: int, unit: int = UNIT) -> list[tuple[int, int]]:
        """The bucket list at `resolution`, sorted by aspect ratio (portrait first), without repeats.
        Raises ValueError naming the flag for a ratio below 1, a side that is not a multiple of
        `unit`, or an empty list."""
        if self.sizes is not None:
            sizes = [(int(w), int(h)) for w, h in self.sizes]
            bad = [list(s) for s in sizes if s[0] <= 0 or s[1] <= 0 or s[0] % unit or s[1] % unit]
            if bad:
                raise ValueError(f"--buckets.sizes {bad}: each side must be a positive multiple of {unit} px "
                                 f"(VAE downsampling × 2×2 packing)")
        else:
            bad = [a for a in self.aspect_ratios if not a >= 1]
            if bad:
                raise ValueError(f"--buckets.aspect_ratios {bad}: give width/height ≥ 1 (portrait twins come from "
                                 "--buckets.portrait)")
            sizes = []
            for a in self.aspect_ratios:
                w = max(unit, round(resolution * math.sqrt(a) / unit) * unit)
                h = max(unit, round(resolution / math.sqrt(a) / unit) * unit)
                sizes.append((w, h))
                if self.portrait and w != h:
                    sizes.append((h, w))
        if not sizes:
            raise ValueError("--buckets gives no bucket: list at least one aspect ratio or size")
        return sorted(set(sizes), key=lambda s: (s[0] / s[1], s[0] * s[1]))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height (in log ratio, so 2:1 and 1:2 are
    as far from square); on a tie the larger one."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


@dataclass(frozen=True)
class Fit:
    """How an image of `source` size becomes a `bucket`: resized by `scale` to `resized` (covering
    the bucket), then the bucket cut from (`left`, `top`) of it: the minimal centre crop."""

    source: tuple[int, int]
    bucket: tuple[int, int]
    scale: float
    resized: tuple[int, int]
    left: int
    top: int

    @property
    def kept(self) -> float:
        """The share of the source image's area the crop keeps."""
        return self.bucket[0] * self.bucket[1] / (self.resized[0] * self.resized[1])

    def box(self, box) -> tuple[list[float], bool] | None:
        """A source-pixel xyxy box in the bucket, normalized to [0, 1], and whether the crop clipped
        it; None when it left the frame: under a pixel wide or high in the bucket, or with less
        than `MIN_VISIBLE` of its area inside."""
        bw, bh = self.bucket
        sx, sy = self.resized[0] / self.source[0], self.resized[1] / self.source[1]
        x0, x1 = box[0] * sx - self.left, box[2] * sx - self.left
        y0, y1 = box[1] * sy - self.top, box[3] * sy - self.top
        cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(bw)), min(y1, float(bh))
        if cx1 - cx0 < 1 or cy1 - cy0 < 1 or (cx1 - cx0) * (cy1 - cy0) < MIN_VISIBLE * (x1 - x0) * (y1 - y0):
            return None
        clipped = (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)
        return [cx0 / bw, cy0 / bh, cx1 / bw, cy1 / bh], clipped


def fit_to_bucket(width: int, height: int, bucket: tuple[int, int]) -> Fit:
    """Resize (keeping the aspect ratio, to cover the bucket) and centre-crop plan of an image."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    nw, nh = max(bw, round(width * scale)), max(bh, round(height * scale))
    return Fit((width, height), (bw, bh), scale, (nw, nh), (nw - bw) // 2, (nh - bh) // 2)


def bucket_of(record: dict) -> tuple[int, int]:
    """A manifest record's bucket (width, height); records written before buckets have the
    prepared image's size (a square)."""
    if "bucket" in record:
        return tuple(record["bucket"])
    return int(record["width"]), int(record["height"])


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}×{bucket[1]}"
