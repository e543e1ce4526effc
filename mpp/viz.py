"""Images for people: box overlays coloured by α (red foreground, blue background) and grids."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

FOREGROUND, BACKGROUND = (255, 40, 40), (40, 90, 255)


def to_uint8(image: Tensor) -> np.ndarray:
    """3×H×W in [-1, 1] → H×W×3 uint8."""
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def draw_boxes(image: np.ndarray, boxes: Tensor, alpha: Tensor | None = None, width: int = 1) -> np.ndarray:
    """Draws normalized xyxy boxes: red where α > 0.5 (identity-bearing), blue otherwise."""
    im = Image.fromarray(image)
    draw = ImageDraw.Draw(im)
    h, w = image.shape[:2]
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        color = FOREGROUND if alpha is not None and float(alpha[k]) > 0.5 else BACKGROUND
        # whole pixels (PIL truncates floats: 91/176·176 would land on pixel 89)
        draw.rectangle([round(x0 * w), round(y0 * h), round(x1 * w) - 1, round(y1 * h) - 1], outline=color, width=width)
    return np.asarray(im)


def grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tiles H×W×3 images row by row with a white gap; images of other sizes (aspect-ratio buckets)
    each sit centred in a cell of the largest height and width, on white."""
    h = max(img.shape[0] for row in rows for img in row)
    w = max(img.shape[1] for row in rows for img in row)
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            top = pad + i * (h + pad) + (h - img.shape[0]) // 2
            left = pad + j * (w + pad) + (w - img.shape[1]) // 2
            out[top : top + img.shape[0], left : left + img.shape[1]] = img
    return out


def to_chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()
