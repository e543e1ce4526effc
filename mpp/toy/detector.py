"""The toy world's instance detector: it stands in for Grounding DINO or OWLv2 in `mpp annotate`
(`--detector toy`), behind the same `mpp.detect.InstanceDetector` protocol.

It is told neither the instances' colours nor their boxes: it segments what is not background (the
toy world's backgrounds and texture colours are pale, white or black; `mpp.toy.scenes`' colour
contract) and splits the rest by colour, one instance per colour that covers enough pixels (every
instance of a toy scene has its own main colour). It ignores the vocabulary: a toy scene has no
other kind of thing. Compressed video shifts colours a little, so pixels are grouped within a
tolerance of each colour mode rather than by exact value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mpp.detect import Detection, nms
from mpp.evaluate import mask_box

PALE = 120  # min channel at or above: a background tone or the white texture
DARK = 45  # max channel below: the black texture
QUANT = 32  # colour bins of this width per channel find the modes


@dataclass
class ToyDetector:
    """Args:
        tol: RGB distance within which a pixel belongs to a colour mode.
        min_pixels: the fewest pixels of one colour that make an instance.
        min_box: the shortest side of a kept box, in pixels.
        trim: share of stray pixels cut at each side of a colour's mask (`mpp.evaluate.mask_box`).
        min_fill: the least share of its box a colour must cover (the colour fringes that 4:2:0 video
            leaves along edges cover little of theirs).
        nms_iou: a box overlapping a better-filled one by more than this IoU is dropped (`mpp.detect.nms`).
    """

    tol: float = 40.0
    min_pixels: int = 60
    min_box: int = 8
    trim: float = 0.01
    min_fill: float = 0.25
    nms_iou: float = 0.5

    def __post_init__(self):
        if self.tol <= 0 or self.min_pixels < 1 or self.min_box < 1:
            raise ValueError(f"ToyDetector: tol, min_pixels and min_box must be positive, got {self}")

    def foreground_pixels(self, image: np.ndarray) -> np.ndarray:
        """H×W mask of pixels that are neither background nor texture."""
        rgb = image[..., :3].astype(np.int32)
        return (rgb.min(-1) < PALE) & (rgb.max(-1) >= DARK)

    def detect_all(self, image: np.ndarray, vocabulary: list[str] | None = None) -> list[Detection]:
        rgb = image[..., :3].astype(np.int32)
        free = self.foreground_pixels(image)
        found = []
        while free.sum() >= self.min_pixels:
            bins = rgb[free] // QUANT
            keys, counts = np.unique(bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2], return_counts=True)
            if counts.max() < self.min_pixels:
                break
            key = keys[counts.argmax()]
            in_bin = free & (((rgb // QUANT) * [64, 8, 1]).sum(-1) == key)
            mode = rgb[in_bin].mean(0)
            diff = rgb - mode
            mask = free & ((diff * diff).sum(-1) <= self.tol * self.tol)
            free &= ~mask
            box = mask_box(mask, trim=self.trim)
            if box is None or mask.sum() < self.min_pixels:
                continue
            x0, y0, x1, y1 = box
            if min(x1 - x0, y1 - y0) < self.min_box:
                continue
            fill = float(mask[y0:y1, x0:x1].mean())
            if fill >= self.min_fill:
                found.append(Detection(box=(float(x0), float(y0), float(x1), float(y1)), label="", score=fill))
        if not found:
            return []
        boxes = torch.tensor([d.box for d in found])
        keep = nms(boxes, torch.tensor([d.score for d in found]), self.nms_iou)
        return sorted((found[i] for i in keep.tolist()), key=lambda d: -d.score)
