"""Evaluation of generated images: placement (mIoU, success at IoU ≥ 0.5) and identity.

    python -m mpp.evaluate --generated generated/ --layouts layouts.jsonl

Placement: a `Detector` finds each instance in the generated image; its box is compared with the
requested one. In the toy world each instance's colour is known (`"color"` in the layout), so
`ToyColorDetector` segments it by colour. For real footage plug in an open-vocabulary detector
queried with the instance caption — e.g. Grounding DINO through transformers'
`AutoModelForZeroShotObjectDetection` — by implementing `Detector.detect`.

Identity: the DINOv2 cosine similarity of the generated crop to its reference (`--dino`, a hub id
or folder) and a colour-histogram similarity that needs no model.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Protocol

import numpy as np
from PIL import Image

from mpp.toy.scenes import box_iou, color_mask, mask_box


class Detector(Protocol):
    def detect(self, image: np.ndarray, instance: dict) -> tuple[float, float, float, float] | None:
        """The pixel xyxy box of `instance` (a layout instance: caption, color, …) in the H×W×3
        uint8 `image`, or None when it is not found."""


class ToyColorDetector:
    """Finds a toy instance by its known colour: pixels within `tol` (RGB distance), the box of
    the mask with `trim` of stray pixels cut at each side."""

    def __init__(self, tol: float = 40.0, trim: float = 0.01):
        self.tol, self.trim = tol, trim

    def detect(self, image: np.ndarray, instance: dict):
        if instance.get("color") is None:
            raise ValueError("ToyColorDetector needs each layout instance's 'color' [r, g, b]")
        return mask_box(color_mask(image, instance["color"], tol=self.tol), trim=self.trim)


def color_histogram_similarity(a: np.ndarray, b: np.ndarray, bins: int = 8) -> float:
    """Histogram intersection of two images' joint RGB histograms (bins per channel), in [0, 1]."""

    def hist(x: np.ndarray) -> np.ndarray:
        q = (x[..., :3].astype(np.int64) * bins) // 256
        h = np.bincount(((q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]).ravel(), minlength=bins**3)
        return h / max(h.sum(), 1)

    return float(np.minimum(hist(a), hist(b)).sum())


def _crop(image: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return image[max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)]


def dino_similarity(encoders, a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of the DINOv2 CLS embeddings of two H×W×3 uint8 images."""
    import torch

    from mpp.data.raw import to_tensor

    with torch.no_grad():
        emb = [encoders.dino_embeds(to_tensor(Image.fromarray(x))[None]) for x in (a, b)]
    return float(torch.nn.functional.cosine_similarity(emb[0], emb[1]).item())


def evaluate(images: dict[str, np.ndarray], layouts: dict[str, dict], detector: Detector, *,
             references: dict[str, np.ndarray] | None = None, encoders=None, iou_threshold: float = 0.5) -> dict:
    """Scores every instance of every generated image.

    images: id → H×W×3 uint8; layouts: id → layout ({"instances": [{"bbox" (normalized), …}]});
    references: instance reference path → image, for the identity scores; encoders: an
    `mpp.encoders.Encoders` whose DINOv2 gives the identity similarity (None: skipped).
    """
    ious, hist_sims, dino_sims = [], [], []
    for sid, image in images.items():
        h, w = image.shape[:2]
        for inst in layouts[sid]["instances"]:
            x0, y0, x1, y1 = inst["bbox"]
            target = (x0 * w, y0 * h, x1 * w, y1 * h)
            found = detector.detect(image, inst)
            ious.append(0.0 if found is None else box_iou(found, target))
            ref = (references or {}).get(inst.get("reference"))
            if ref is not None:
                crop = _crop(image, target)
                hist_sims.append(color_histogram_similarity(crop, ref))
                if encoders is not None:
                    dino_sims.append(dino_similarity(encoders, crop, ref))
    result = {
        "images": len(images), "instances": len(ious),
        "miou": float(np.mean(ious)) if ious else 0.0,
        f"success_at_{iou_threshold}": float(np.mean([i >= iou_threshold for i in ious])) if ious else 0.0,
    }
    if hist_sims:
        result["color_histogram_similarity"] = float(np.mean(hist_sims))
    if dino_sims:
        result["dino_similarity"] = float(np.mean(dino_sims))
    return result


def load_generated(generated_dir: str, layouts_path: str):
    """Reads generate's output and the layouts it came from (boxes normalized as in generation)."""
    with open(os.path.join(generated_dir, "generated.json")) as f:
        report = json.load(f)
    raw = {}
    root = os.path.dirname(os.path.abspath(layouts_path))
    with open(layouts_path) as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                data = json.loads(line)
                sid = str(data["id"]) if data.get("id") not in (None, "") else f"line{number:05d}"  # as generate reads it
                raw.setdefault(sid, data)
    images, layouts, references = {}, {}, {}
    for record in report["images"]:
        image = np.asarray(Image.open(os.path.join(generated_dir, record["image"])).convert("RGB"))
        images[record["id"]] = image
        insts = raw[record["id"]]["instances"]
        layouts[record["id"]] = {"instances": [{**inst, "bbox": box} for inst, box in zip(insts, record["boxes"])]}
        for inst in insts:
            ref = inst.get("reference")
            if ref and ref not in references:
                references[ref] = np.asarray(Image.open(os.path.join(root, ref)).convert("RGB"))
    return images, layouts, references


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mpp evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--generated", required=True, help="output folder of python -m mpp.generate")
    p.add_argument("--layouts", required=True, help="the layouts JSONL it generated from (with instance colours)")
    p.add_argument("--tol", type=float, default=40.0, help="colour tolerance of the toy detector")
    p.add_argument("--dino", default=None, help="DINOv2 hub id or folder for the identity similarity")
    a = p.parse_args(argv)
    images, layouts, references = load_generated(a.generated, a.layouts)
    encoders = None
    if a.dino:
        from mpp.encoders import EncoderSettings, Encoders

        encoders = Encoders(EncoderSettings(dino=a.dino))
    print(json.dumps(evaluate(images, layouts, ToyColorDetector(tol=a.tol), references=references, encoders=encoders)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
