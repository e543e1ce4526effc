"""Evaluation of generated images: placement (mIoU, success at IoU ≥ 0.5) and identity.

    mpp evaluate --generated generated/ --layouts layouts.jsonl [--detector toy|grounding-dino|owlv2]

Placement, as InstanceAssemble and LayoutSAM-Eval measure it: a `Detector` finds each instance in
the generated image; its box is compared with the requested one (success at IoU ≥ 0.5; a missed
instance counts IoU 0 in the mIoU). In the toy world each instance's colour is known (`"color"` in
the layout), so `ToyColorDetector` (`--detector toy`, the default) segments it by colour. On real
images an open-vocabulary detector (`mpp.detect`: Grounding DINO or OWLv2 through transformers,
`--detector.model` a hub id or folder) is queried with the instance's caption and its best box is
taken.

Identity: the DINOv2 cosine similarity of the generated crop to its reference (`--dino`, a hub id
or folder), a colour-histogram similarity that needs no model, and the CLIP score of the crop
against the instance's caption (`--clip_model`, a `CLIPModel` hub id or folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mpp.data.raw import to_tensor
from mpp.detect import DEFAULT_MODELS, FLAG, DetectSettings, load_detector
from mpp.encoders import EncoderSettings, Encoders, parse_dtype
from mpp.layouts import load_generated
from mpp.nn.backbone import explain_missing

TOY = "toy"
DETECTOR_KINDS = (TOY, *DEFAULT_MODELS)


def box_iou(a, b) -> float:
    """IoU of two xyxy boxes."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def color_mask(image: np.ndarray, color, tol: float = 40.0) -> np.ndarray:
    """Boolean H×W mask of pixels within Euclidean RGB distance ``tol`` of ``color``."""
    diff = image[..., :3].astype(np.int32) - np.asarray(color, dtype=np.int32)
    return (diff * diff).sum(-1) <= tol * tol


def mask_box(mask: np.ndarray, trim: float = 0.0) -> tuple[int, int, int, int] | None:
    """xyxy box (x1/y1 exclusive) of a boolean mask, or None if empty.

    ``trim`` > 0 drops that fraction of the mask's pixels at each side (per axis), which makes the
    box robust to stray pixels of a similar colour, e.g. in decoded or generated images.
    """
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    if trim <= 0:
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    q = (100.0 * trim, 100.0 * (1.0 - trim))
    x0, x1 = np.percentile(xs, q, method="nearest")
    y0, y1 = np.percentile(ys, q, method="nearest")
    return int(x0), int(y0), int(x1) + 1, int(y1) + 1


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
    with torch.no_grad():
        emb = [encoders.dino_embeds(to_tensor(Image.fromarray(x))[None]) for x in (a, b)]
    return float(torch.nn.functional.cosine_similarity(emb[0], emb[1]).item())


class ClipTextScorer:
    """CLIP text–crop score: the cosine of the CLIP image features of a crop and the CLIP text
    features of a caption (`CLIPModel.get_image_features` / `get_text_features`)."""

    def __init__(self, path: str, device: str | torch.device | None = None, dtype: str = "float32",
                 flag: str = "clip_model"):
        from transformers import AutoProcessor, CLIPModel

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = parse_dtype(dtype)
        with explain_missing(flag, path, "the CLIP model's processor", also=(ValueError,)):
            self.processor = AutoProcessor.from_pretrained(path)
        with explain_missing(flag, path, "the CLIP model (CLIPModel)", also=(ValueError,)):
            self.model = CLIPModel.from_pretrained(path).to(self.device, self.dtype).eval()

    @torch.no_grad()
    def score(self, crop: np.ndarray, caption: str) -> float:
        pixels = self.processor(images=[Image.fromarray(crop[..., :3])], return_tensors="pt")["pixel_values"]
        text = self.processor(text=[caption], return_tensors="pt", padding=True, truncation=True,
                              max_length=int(self.model.config.text_config.max_position_embeddings))
        image_features = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        text_features = _features(self.model.get_text_features(
            input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)))
        return float(torch.nn.functional.cosine_similarity(image_features.float(), text_features.float()).item())


def _features(output) -> torch.Tensor:
    """The projected features, from a tensor (transformers 4) or an output's pooler_output (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def evaluate(images: dict[str, np.ndarray], layouts: dict[str, dict], detector: Detector, *,
             references: dict[str, np.ndarray] | None = None, encoders=None, iou_threshold: float = 0.5,
             clip: ClipTextScorer | None = None, progress: bool = True) -> dict:
    """Scores every instance of every generated image.

    images: id → H×W×3 uint8; layouts: id → layout ({"instances": [{"bbox" (normalized), …}]});
    references: instance reference path → image, for the identity scores; encoders: an
    `mpp.encoders.Encoders` whose DINOv2 gives the identity similarity (None: skipped); clip: a
    `ClipTextScorer` for the crop–caption score of every captioned instance (None: skipped);
    progress: a progress bar over the images.
    """
    ious, hist_sims, dino_sims, clip_sims = [], [], [], []
    bar = tqdm(images.items(), total=len(images), desc="evaluate", unit="image",
               disable=not progress or len(images) < 2)
    for sid, image in bar:
        h, w = image.shape[:2]
        for inst in layouts[sid]["instances"]:
            x0, y0, x1, y1 = inst["bbox"]
            target = (x0 * w, y0 * h, x1 * w, y1 * h)
            found = detector.detect(image, inst)
            ious.append(0.0 if found is None else box_iou(found, target))
            crop = _crop(image, target)
            if clip is not None and inst.get("caption"):
                clip_sims.append(clip.score(crop, inst["caption"]))
            ref = (references or {}).get(inst.get("reference"))
            if ref is not None:
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
    if clip_sims:
        result["clip_text_similarity"] = float(np.mean(clip_sims))
    return result


SETTING_FLAGS = {  # DetectSettings' fields but the model, as --detector.<name>: type and help
    "score_threshold": (float, "boxes scoring at most this are dropped"),
    "text_threshold": (float, "Grounding DINO: one of a phrase's tokens must score above this"),
    "nms_iou": (float, "class-agnostic NMS: boxes overlapping a better one by more IoU are dropped"),
    "min_box": (float, "boxes with a shorter side (pixels) are dropped"),
    "device": (str, "torch device of the detector and of CLIP"),
    "dtype": (str, "float32, float16 or bfloat16, of the detector and of CLIP"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpp evaluate", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--generated", required=True, help="output folder of mpp generate")
    p.add_argument("--layouts", required=True, help="the layouts JSONL it generated from")
    p.add_argument("--out", default=None, help="also write the scores to this JSON file")
    p.add_argument(f"--{FLAG}", dest="detector", choices=DETECTOR_KINDS, default=TOY,
                   help="toy: by the instances' colours; grounding-dino, owlv2: queried with each instance's caption")
    p.add_argument(f"--{FLAG}.model", "--detector_model", dest="detector_model", default=None,
                   metavar="MODEL", help="detector hub id or folder (defaults: "
                   + ", ".join(f"{k}: {v}" for k, v in DEFAULT_MODELS.items()) + ")")
    for name, (kind, what) in SETTING_FLAGS.items():
        p.add_argument(f"--{FLAG}.{name}", dest=f"detector_{name}", type=kind, default=None, metavar=name.upper(),
                       help=f"{what} (default: {getattr(DetectSettings, name)})")
    p.add_argument("--tol", type=float, default=40.0, help="colour tolerance of the toy detector")
    p.add_argument("--dino", default=None, help="DINOv2 hub id or folder for the identity similarity")
    p.add_argument("--clip_model", default=None, help="CLIPModel hub id or folder for the crop–caption score")
    return p


def build_detector(a: argparse.Namespace):
    """The `Detector` the command line asks for."""
    given = {name: getattr(a, f"detector_{name}") for name in ("model", *SETTING_FLAGS)}
    given = {k: v for k, v in given.items() if v is not None}
    if a.detector == TOY:
        detector_only = [k for k in given if k not in ("device", "dtype")]  # those two also place CLIP
        if detector_only:
            flags = ", ".join(f"--{FLAG}.{k}" for k in detector_only)
            raise ValueError(f"{flags}: for --{FLAG} grounding-dino or owlv2; --{FLAG} toy finds instances by colour")
        DetectSettings(**given)  # validates --detector.device and --detector.dtype, which CLIP uses
        return ToyColorDetector(tol=a.tol)
    return load_detector(a.detector, DetectSettings(**given))


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    detector = build_detector(a)
    images, layouts, references = load_generated(a.generated, a.layouts)
    encoders = Encoders(EncoderSettings(dino=a.dino)) if a.dino else None
    clip = None
    if a.clip_model:
        clip = ClipTextScorer(a.clip_model, device=a.detector_device, dtype=a.detector_dtype or "float32")
    else:
        print("note: no --clip_model, so the CLIP crop–caption score (clip_text_similarity) is skipped",
              file=sys.stderr)
    result = evaluate(images, layouts, detector, references=references, encoders=encoders, clip=clip)
    result["detector"] = a.detector if a.detector == TOY else f"{a.detector}:{detector.path}"
    text = json.dumps(result)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
