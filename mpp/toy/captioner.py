"""The toy world's captioner: it stands in for Florence-2 or BLIP in `mpp annotate`
(`--captioner toy`), behind the same `mpp.caption.Captioner` protocol.

An instance is named by what it looks like: its colour word is the toy palette's nearest to the
box's dominant colour (`mpp.toy.detector`'s foreground pixels), a background element (grey, green,
brown) takes its kind's noun ("a grey block"), and a character's shape and texture come from the toy
identity judge (`mpp.toy.judge`, a classifier of renders), in the toy captions' own words ("a teal
dotted cross"). A scene is captioned as the toy world captions it: its instances, then its
background tone.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from mpp.encoders import crop_boxes
from mpp.nn.backbone import explain_missing

from .codec import PatchCodec
from .detector import PALE, ToyDetector
from .judge import JUDGE_SIZE, IdentityJudge, load_or_train_judge
from .scenes import BACKGROUND_TONES, ELEMENT_KINDS, IDENTITY_COLORS, SHAPES, TEXTURES, _join, make_identity

ELEMENTS = {color: (word, noun) for word, noun, _, color in ELEMENT_KINDS}
PALETTE = {**{c: ("identity", name) for name, c in IDENTITY_COLORS.items()}, **{c: ("element", c) for c in ELEMENTS}}


def _nearest(color: np.ndarray, colors) -> tuple:
    colors = list(colors)
    d = ((np.asarray(colors, dtype=np.float64) - color) ** 2).sum(-1)
    return colors[int(d.argmin())]


class ToyCaptioner:
    """Args:
        judge: the toy identity judge (`mpp.toy.judge.load_or_train_judge`).
        margin: share of each box's size added on each side of the judge's crop (as it was trained).
    """

    def __init__(self, judge: IdentityJudge, margin: float = 0.1):
        self.judge, self.margin = judge.eval(), margin
        self._detector = ToyDetector()

    def _dominant(self, image: np.ndarray, box) -> np.ndarray | None:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        patch = image[y0:y1, x0:x1, :3]
        pixels = patch[self._detector.foreground_pixels(patch)]
        if not len(pixels):
            return None
        keys, counts = np.unique(pixels // 16, axis=0, return_counts=True)
        mode = keys[counts.argmax()]
        return pixels[((pixels // 16) == mode).all(-1)].mean(0)

    def caption_regions(self, image: np.ndarray, boxes: list) -> list[str]:
        if not boxes:
            return []
        h, w = image.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1).float()[None] / 127.5 - 1.0
        norm = torch.tensor([[[b[0] / w, b[1] / h, b[2] / w, b[3] / h] for b in boxes]], dtype=torch.float32)
        judged = self.judge.predict(crop_boxes(x, norm, size=JUDGE_SIZE, margin=self.margin)[0])
        out = []
        for box, (_, shape, texture) in zip(boxes, judged.tolist(), strict=True):
            color = self._dominant(image, box)
            kind, name = PALETTE[_nearest(color, PALETTE)] if color is not None else ("identity", "grey")
            if kind == "element":
                word, noun = ELEMENTS[name]
                out.append(f"a {word} {noun}")
            else:
                out.append(make_identity(name, SHAPES[shape], TEXTURES[texture]).caption)
        return out

    def caption(self, image: np.ndarray, regions: list[str] | None = None) -> str:
        """The scene's caption; `regions`: its instances' captions where already known."""
        if regions is None:
            regions = self.caption_regions(image, [d.box for d in self._detector.detect_all(image, [])])
        rgb = image[..., :3].reshape(-1, 3).astype(np.int32)
        pale = rgb[rgb.min(-1) >= PALE]
        tone = "sandy"
        if len(pale):
            keys, counts = np.unique(pale // 8, axis=0, return_counts=True)
            mode = pale[((pale // 8) == keys[counts.argmax()]).all(-1)].mean(0)
            tone = {v: k for k, v in BACKGROUND_TONES.items()}[_nearest(mode, BACKGROUND_TONES.values())]
        return f"{_join(regions)} on a {tone} background" if regions else f"a {tone} background"


def load_toy_captioner(models_dir: str, flag: str = "captioner.model") -> ToyCaptioner:
    """The toy captioner of the toy bundle in `models_dir`: its judge is cached there as
    judge.safetensors, trained on the bundle's codec the first time (about a minute)."""
    with explain_missing(flag, models_dir, "the toy codec (vae/)"):
        codec = PatchCodec.from_pretrained(os.path.join(models_dir, "vae"))
    judge, _ = load_or_train_judge(os.path.join(models_dir, "judge.safetensors"), codec)
    return ToyCaptioner(judge)
