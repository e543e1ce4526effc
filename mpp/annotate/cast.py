"""The cast: `CAST_DIR/<name>/*.jpg|png`, one folder per character or prop, linked to the boxes of
the footage by DINOv2 similarity.

Each cast photo is run through the annotation detector and the best box (highest score, then the
largest) is what stands for the member: a full-frame photo of an actor becomes the crop of the
actor. That crop is the reference written into the raw layout (RAW/refs/<name>/<photo>.png), so the
layout is self-contained. A photo without a detectable instance is named and skipped; a cast folder
without any usable photo is an error naming `--cast`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mpp.caption import crop_with_margin
from mpp.data.raw import IMAGE_EXTS
from mpp.detect import InstanceDetector

log = logging.getLogger(__name__)


@dataclass
class Cast:
    names: list[str]  # one per photo kept
    photos: list[str]  # the photo's path
    crops: list[np.ndarray]  # the detected box of each photo, H×W×3 uint8
    embeds: Tensor  # P×D unit DINOv2 embeddings of the crops
    skipped: list[str] = field(default_factory=list)  # "photo: why"

    @property
    def members(self) -> list[str]:
        return sorted(set(self.names))

    def link(self, embeds: Tensor, threshold: float) -> list[tuple[str | None, int | None, float]]:
        """For each row of the K×D unit `embeds`: (member, index of its most similar photo,
        similarity) of the most similar photo, or (None, None, similarity) below `threshold`."""
        if not len(embeds) or not len(self.names):
            return [(None, None, 0.0)] * len(embeds)
        sim = embeds @ self.embeds.T
        best, photo = sim.max(-1)
        return [(self.names[p], p, float(s)) if s >= threshold else (None, None, float(s))
                for p, s in zip(photo.tolist(), best.tolist(), strict=True)]


def best_box(detections) -> tuple[float, float, float, float] | None:
    if not detections:
        return None
    top = max(detections, key=lambda d: (round(d.score, 3), (d.box[2] - d.box[0]) * (d.box[3] - d.box[1])))
    return top.box


def load_cast(cast_dir: str, detector: InstanceDetector, vocabulary: list[str], embed, *,
              margin: float = 0.1) -> Cast:
    """The cast of `cast_dir`; `embed`: list of H×W×3 uint8 crops → K×D unit embeddings."""
    if not os.path.isdir(cast_dir):
        raise ValueError(f"--cast {cast_dir!r} is not a folder (expected one subfolder per character)")
    names, photos, crops, skipped = [], [], [], []
    for name in sorted(os.listdir(cast_dir)):
        folder = os.path.join(cast_dir, name)
        if not os.path.isdir(folder) or name.startswith("."):
            continue
        for file in sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS)):
            path = os.path.join(folder, file)
            try:
                with Image.open(path) as im:
                    image = np.asarray(im.convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                skipped.append(f"{path}: unreadable image ({e})")
                continue
            box = best_box(detector.detect_all(image, vocabulary))
            if box is None:
                skipped.append(f"{path}: no instance detected in the cast photo")
                continue
            names.append(name)
            photos.append(path)
            crops.append(crop_with_margin(image, box, margin))
    for why in skipped:
        log.warning("cast: skipping %s", why)
    if not names:
        raise ValueError(f"--cast {cast_dir!r}: no usable photo (expected <cast>/<name>/*.jpg|png with a detectable "
                         f"instance each){'; ' + '; '.join(skipped[:3]) if skipped else ''}")
    embeds = embed(crops)
    log.info("cast: %d photos of %d members from %s", len(names), len(set(names)), cast_dir)
    return Cast(names, photos, crops, embeds, skipped)


def dino_embedder(encoders, batch: int = 64):
    """`embed` for `load_cast` and the analysis: crops → unit DINOv2 embeddings (`mpp.encoders`)."""

    @torch.no_grad()
    def embed(crops: list[np.ndarray]) -> Tensor:
        out = []
        for i in range(0, len(crops), batch):
            size = encoders.dino_size
            x = torch.stack([torch.from_numpy(np.array(Image.fromarray(c).resize((size, size), Image.BICUBIC)))
                             for c in crops[i : i + batch]]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            out.append(torch.nn.functional.normalize(encoders.dino_embeds(x).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 1)

    return embed
