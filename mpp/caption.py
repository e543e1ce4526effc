"""Captioners: a scene caption for a frame and one caption per instance box, for `mpp annotate`.

    from mpp.caption import load_captioner

    captioner = load_captioner("florence2", "florence-community/Florence-2-large", device="cuda")
    scene = captioner.caption(image)                       # H×W×3 uint8 → "a man walking down a street"
    per_box = captioner.caption_regions(image, [[x0, y0, x1, y1], ...])   # pixel xyxy → one str each

Two real captioners through transformers, each loaded with `from_pretrained` from a hub id or a
local folder (model and processor in the same place):

- ``florence2``: `Florence2ForConditionalGeneration` (the transformers-native checkpoints, e.g.
  ``florence-community/Florence-2-base``/``-large``); the scene with the ``<CAPTION>`` task, each box
  with ``<REGION_TO_DESCRIPTION>`` and the box as four location tokens (coordinates quantized to
  Florence's 1000 bins), so the region is described in the context of the whole frame.
- ``blip``: `BlipForConditionalGeneration` (e.g. ``Salesforce/blip-image-captioning-large``); the
  scene from the full frame, each box from its crop widened by ``crop_margin`` of its size on each
  side (BLIP has no notion of a region).

Decoding is deterministic (beam search or greedy, no sampling). The toy world's captioner lives in
`mpp.toy` and implements the same `Captioner` protocol. Settings are validated with a ValueError
that names the command-line flag (``--captioner.max_new_tokens`` ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import transformers
from transformers import AutoProcessor

from mpp.encoders import parse_dtype
from mpp.nn.backbone import explain_missing

Box = tuple[float, float, float, float] | list[float]  # xyxy pixels of the image

DEFAULT_MODELS = {"florence2": "florence-community/Florence-2-large",
                  "blip": "Salesforce/blip-image-captioning-large"}
FLORENCE_BINS = 1000  # Florence-2's location tokens <loc_0> … <loc_999>
_LOC_TOKEN = re.compile(r"<loc_\d+>")


class Captioner(Protocol):
    def caption(self, image: np.ndarray) -> str:
        """A caption of the whole H×W×3 uint8 `image`."""

    def caption_regions(self, image: np.ndarray, boxes: list[Box]) -> list[str]:
        """One caption per pixel xyxy box of `image`, in order."""


@dataclass(frozen=True)
class CaptionSettings:
    """How a captioner decodes; `flag` is the command-line prefix its errors name.

    Args:
        max_new_tokens: longest caption, in tokens.
        num_beams: beam search width (1: greedy).
        batch_size: boxes captioned per forward pass.
        crop_margin: (BLIP) fraction of the box size added on each side of its crop.
        device: where the model runs.
        dtype: float32, float16 or bfloat16.
    """

    max_new_tokens: int = 40
    num_beams: int = 3
    batch_size: int = 8
    crop_margin: float = 0.1
    device: str = "cpu"
    dtype: str = "float32"
    flag: str = "captioner"

    def __post_init__(self):
        for name in ("max_new_tokens", "num_beams", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{self.flag}.{name} must be a whole number >= 1, got {value!r}")
        if not 0 <= self.crop_margin <= 1:
            raise ValueError(f"--{self.flag}.crop_margin must lie in [0, 1], got {self.crop_margin!r}")
        parse_dtype(self.dtype, f"--{self.flag}.dtype")
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"--{self.flag}.device: {self.device!r} is not a torch device ({e})") from e

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    def generate_kwargs(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": False}


def check_image(image: np.ndarray) -> np.ndarray:
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"a captioner takes an H×W×3 uint8 image, got a {got}")
    return image


def check_boxes(boxes: list[Box], width: int, height: int) -> list[tuple[float, float, float, float]]:
    """The boxes as float tuples; a box that is not 4 finite numbers with positive area inside the
    width × height image is refused, naming it by index."""
    out = []
    for k, box in enumerate(boxes):
        values = [float(v) for v in box] if len(box) == 4 else []
        if not values or not all(np.isfinite(values)):
            raise ValueError(f"box {k} {list(box)!r} is not 4 finite numbers (pixel xyxy)")
        x0, y0, x1, y1 = values
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {k} {values} has no area (pixel xyxy: x1 > x0 and y1 > y0)")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ValueError(f"box {k} {values} lies outside the {width}×{height} image")
        out.append((x0, y0, x1, y1))
    return out


def crop_with_margin(image: np.ndarray, box: Box, margin: float) -> np.ndarray:
    """The box widened by `margin` of its size on each side, clipped to the image, at least 1 px."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    left, top = int(max(0.0, np.floor(x0 - mx))), int(max(0.0, np.floor(y0 - my)))
    right, bottom = int(min(w, np.ceil(x1 + mx))), int(min(h, np.ceil(y1 + my)))
    return image[top:max(bottom, top + 1), left:max(right, left + 1)]


def florence_region_prompt(box: Box, width: int, height: int) -> str:
    """``<REGION_TO_DESCRIPTION>`` with the box as Florence-2's location tokens (1000 bins per axis)."""
    def loc(value: float, size: int) -> str:
        return f"<loc_{min(FLORENCE_BINS - 1, max(0, int(value / size * FLORENCE_BINS)))}>"

    x0, y0, x1, y1 = box
    return "<REGION_TO_DESCRIPTION>" + loc(x0, width) + loc(y0, height) + loc(x1, width) + loc(y1, height)


def _clean(text: str) -> str:
    return " ".join(_LOC_TOKEN.sub(" ", text).split())


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class _HFCaptioner:
    """A transformers captioning model and its processor, loaded from one hub id or folder."""

    class_name: str  # in transformers
    what: str

    def __init__(self, model: str, settings: CaptionSettings):
        self.settings = settings
        self.path = model
        model_class = getattr(transformers, self.class_name, None)
        if model_class is None:
            raise ValueError(f"--{settings.flag}: transformers {transformers.__version__} has no {self.class_name}; "
                             "upgrade transformers")
        with explain_missing(f"{settings.flag}.model", model, self.what, also=(ValueError,)):
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = model_class.from_pretrained(model)
        self.model.to(device=settings.device, dtype=settings.torch_dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def _generate(self, images: list[np.ndarray], prompts: list[str] | None = None) -> list[str]:
        kwargs = {"images": images, "return_tensors": "pt"}
        if prompts is not None:
            kwargs["text"] = prompts
        inputs = self.processor(**kwargs).to(self.settings.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.settings.torch_dtype)
        ids = self.model.generate(**inputs, **self.settings.generate_kwargs())
        return [_clean(t) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]


class FlorenceCaptioner(_HFCaptioner):
    """Florence-2: ``<CAPTION>`` for the scene, ``<REGION_TO_DESCRIPTION>`` per box, in the full frame."""

    what = "the Florence-2 captioner (Florence2ForConditionalGeneration and its processor)"

    class_name = "Florence2ForConditionalGeneration"

    def caption(self, image: np.ndarray) -> str:
        return self._generate([check_image(image)], ["<CAPTION>"])[0]

    def caption_regions(self, image: np.ndarray, boxes: list[Box]) -> list[str]:
        h, w = check_image(image).shape[:2]
        prompts = [florence_region_prompt(b, w, h) for b in check_boxes(boxes, w, h)]
        return [c for chunk in _chunks(prompts, self.settings.batch_size)
                for c in self._generate([image] * len(chunk), chunk)]


class BlipCaptioner(_HFCaptioner):
    """BLIP: the full frame for the scene, each box's crop (with a margin) for the instances."""

    what = "the BLIP captioner (BlipForConditionalGeneration and its processor)"

    class_name = "BlipForConditionalGeneration"

    def caption(self, image: np.ndarray) -> str:
        return self._generate([check_image(image)])[0]

    def caption_regions(self, image: np.ndarray, boxes: list[Box]) -> list[str]:
        h, w = check_image(image).shape[:2]
        crops = [crop_with_margin(image, b, self.settings.crop_margin) for b in check_boxes(boxes, w, h)]
        return [c for chunk in _chunks(crops, self.settings.batch_size) for c in self._generate(chunk)]


CAPTIONERS = {"florence2": FlorenceCaptioner, "blip": BlipCaptioner}


def load_captioner(kind: str, model: str | None = None, *, device: str = "cpu", dtype: str = "float32",
                   max_new_tokens: int = 40, num_beams: int = 3, batch_size: int = 8, crop_margin: float = 0.1,
                   flag: str = "captioner") -> Captioner:
    """The captioner `kind` ("florence2" or "blip") from `model` (hub id or local folder; None: the
    kind's default, `DEFAULT_MODELS`). Errors name ``--<flag>``, ``--<flag>.model``, ``--<flag>.<setting>``."""
    if kind not in CAPTIONERS:
        raise ValueError(f"--{flag} must be one of {sorted(CAPTIONERS)}, got {kind!r}")
    settings = CaptionSettings(max_new_tokens=max_new_tokens, num_beams=num_beams, batch_size=batch_size,
                               crop_margin=crop_margin, device=device, dtype=dtype, flag=flag)
    return CAPTIONERS[kind](model or DEFAULT_MODELS[kind], settings)
