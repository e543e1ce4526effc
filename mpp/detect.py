"""Open-vocabulary instance detection: what `mpp annotate` boxes instances with and what
`mpp evaluate --detector` scores placement with.

A detector answers `detect_all(image, vocabulary)` with every instance it finds of the vocabulary's
phrases (`Detection`: pixel xyxy box, the phrase, a score). Thresholds, NMS and the minimum box size
are `DetectSettings`. Grounding DINO and OWLv2 (transformers, a hub id or a local folder) come from
`load_detector(kind, settings)`; on the command line they are `--detector grounding-dino|owlv2` and
`--detector.<field>` for each `DetectSettings` field. The toy world's detector
(`mpp.toy.detector.ToyDetector`) implements the same protocol without a vocabulary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from mpp.encoders import parse_dtype
from mpp.nn.backbone import explain_missing


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # xyxy pixels of the image, x1/y1 exclusive
    label: str  # the vocabulary phrase it answers ("" where the detector has no vocabulary)
    score: float  # in [0, 1]


class InstanceDetector(Protocol):
    def detect_all(self, image: np.ndarray, vocabulary: list[str]) -> list[Detection]:
        """Every instance of `vocabulary`'s phrases in the H×W×3 uint8 `image`, after the detector's
        score threshold, NMS and minimum box size, best score first."""


GROUNDING_DINO, OWLV2 = "grounding-dino", "owlv2"
DEFAULT_MODELS = {GROUNDING_DINO: "IDEA-Research/grounding-dino-tiny", OWLV2: "google/owlv2-base-patch16-ensemble"}
MODEL_TYPES = {GROUNDING_DINO: "grounding-dino", OWLV2: "owlv2"}  # config.json's model_type of each kind
FLAG = "detector"  # the flags are --detector (the kind) and --detector.<field> (DetectSettings)


@dataclass
class DetectSettings:
    """How an open-vocabulary detector is loaded and how its raw boxes are filtered.

    Args:
        model: hub id or local folder (None: the kind's default, `DEFAULT_MODELS`).
        score_threshold: a box is kept when its score exceeds this.
        text_threshold: Grounding DINO: a box answers a phrase when one of the phrase's tokens
            scores above this (OWLv2 ignores it).
        nms_iou: class-agnostic non-maximum suppression: a box overlapping a better one by more
            than this IoU is dropped (1.0: no NMS).
        min_box: boxes whose shorter side is under this many pixels are dropped.
        device: torch device (None: cuda when available, else cpu).
        dtype: float32, float16 or bfloat16.
    """

    model: str | None = None
    score_threshold: float = 0.3
    text_threshold: float = 0.25
    nms_iou: float = 0.5
    min_box: float = 4.0
    device: str | None = None
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("score_threshold", "text_threshold"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{FLAG}.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"--{FLAG}.nms_iou must be in (0, 1] (1: no NMS), got {self.nms_iou!r}")
        if not self.min_box >= 0:
            raise ValueError(f"--{FLAG}.min_box must be ≥ 0 pixels, got {self.min_box!r}")
        if self.model is not None and not str(self.model).strip():
            raise ValueError(f"--{FLAG}.model must be a hub id or a folder, got {self.model!r}")
        parse_dtype(self.dtype, f"--{FLAG}.dtype")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"--{FLAG}.device: {self.device!r} is not a torch device ({e})") from e

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every xyxy box of `a` (N×4) with every one of `b` (M×4): N×M."""
    lo = torch.maximum(a[:, None, :2], b[None, :, :2])
    hi = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first."""
    order = torch.argsort(scores, descending=True, stable=True)
    overlaps = pairwise_iou(boxes[order], boxes[order])
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlaps[i] > iou
    return order[torch.tensor(keep, dtype=torch.long)]


def finalize(detections: list[Detection], settings: DetectSettings, width: int, height: int) -> list[Detection]:
    """Boxes clipped to the image; then the score threshold, the minimum box side and class-agnostic
    NMS applied; best score first."""
    clipped = []
    for d in detections:
        x0, y0, x1, y1 = (float(v) for v in d.box)
        box = (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))
        side = min(box[2] - box[0], box[3] - box[1])
        if d.score > settings.score_threshold and side > 0 and side >= settings.min_box:
            clipped.append(Detection(box, d.label, float(d.score)))
    if not clipped:
        return []
    keep = nms(torch.tensor([d.box for d in clipped], dtype=torch.float64),
               torch.tensor([d.score for d in clipped], dtype=torch.float64), settings.nms_iou)
    return [clipped[i] for i in keep.tolist()]


def _phrases(vocabulary: list[str]) -> list[str]:
    if isinstance(vocabulary, str) or not vocabulary:
        raise ValueError(f"a detector's vocabulary is a non-empty list of phrases, got {vocabulary!r}")
    for phrase in vocabulary:
        if not isinstance(phrase, str) or not phrase.strip(" ."):
            raise ValueError(f"vocabulary phrase {phrase!r} is empty (vocabulary: {vocabulary!r})")
    return list(vocabulary)


class _TransformersDetector(ABC):
    """Loading, devices and the `mpp.evaluate.Detector` side, shared by the transformers detectors."""

    kind: str
    model_class: str  # the transformers class of the kind

    def __init__(self, settings: DetectSettings | None = None):
        import transformers

        self.settings = settings or DetectSettings()
        self.path = str(self.settings.model or DEFAULT_MODELS[self.kind])
        self.device, self.dtype = self.settings.torch_device(), parse_dtype(self.settings.dtype)
        what = f"the {self.kind} detector ({self.model_class})"
        with explain_missing(f"{FLAG}.model", self.path, what, also=(ValueError,)):
            config = transformers.AutoConfig.from_pretrained(self.path)
        if config.model_type != MODEL_TYPES[self.kind]:
            raise ValueError(f"--{FLAG}.model: {self.path!r} holds a {config.model_type!r} model, not the "
                             f"{MODEL_TYPES[self.kind]!r} that --{FLAG} {self.kind} needs")
        with explain_missing(f"{FLAG}.model", self.path, f"the processor of {what}", also=(ValueError,)):
            self.processor = transformers.AutoProcessor.from_pretrained(self.path)
        with explain_missing(f"{FLAG}.model", self.path, what):
            model = getattr(transformers, self.model_class).from_pretrained(self.path, config=config)
        self.model = model.to(self.device, self.dtype).eval()

    def _to_device(self, inputs) -> dict:
        return {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in inputs.items()}

    def detect_all(self, image: np.ndarray, vocabulary: list[str]) -> list[Detection]:
        """Every instance of `vocabulary`'s phrases in the H×W×3 uint8 `image`, best score first."""
        phrases = _phrases(vocabulary)
        h, w = image.shape[:2]
        with torch.no_grad():
            raw = self._detect(Image.fromarray(np.ascontiguousarray(image[..., :3])), phrases)
        return finalize(raw, self.settings, w, h)

    def detect(self, image: np.ndarray, instance: dict) -> tuple[float, float, float, float] | None:
        """`mpp.evaluate.Detector`: the best box for the instance's caption, or None."""
        caption = instance.get("caption")
        if not isinstance(caption, str) or not caption.strip(" ."):
            raise ValueError(f"--{FLAG} {self.kind} queries each layout instance's 'caption'; "
                             f"this instance has none: {instance!r}")
        found = self.detect_all(image, [caption])
        return found[0].box if found else None

    @abstractmethod
    def _detect(self, image: Image.Image, phrases: list[str]) -> list[Detection]:
        """The model's detections of `phrases` in `image`, before thresholds and NMS."""


class GroundingDinoDetector(_TransformersDetector):
    """Grounding DINO: the phrases joined into one prompt ("a cat. a dog."), in chunks that fit the
    model's text length; each box is labelled with the phrase whose tokens score highest."""

    kind, model_class = GROUNDING_DINO, "GroundingDinoForObjectDetection"

    def _detect(self, image, phrases):
        found = []
        for chunk in self._chunks(phrases):
            found += self._detect_prompt(image, chunk)
        return found

    def _chunks(self, phrases: list[str]) -> list[list[str]]:
        budget = int(self.model.config.max_text_len) - 2  # [CLS] and [SEP]
        chunks, used = [[]], 0
        for phrase in phrases:
            n = len(self.processor.tokenizer(_clean(phrase), add_special_tokens=False)["input_ids"]) + 1  # "."
            if n > budget:
                raise ValueError(f"--{FLAG} {self.kind}: the phrase {phrase!r} has {n} tokens, more than the "
                                 f"model's {budget} ({self.path})")
            if used + n > budget:
                chunks.append([])
                used = 0
            chunks[-1].append(phrase)
            used += n
        return chunks

    def _detect_prompt(self, image: Image.Image, phrases: list[str]) -> list[Detection]:
        text, spans = _prompt(phrases)
        offsets = self.processor.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        tokens = [[i for i, (s, e) in enumerate(offsets) if e > s and s >= a and e <= b] for a, b in spans]
        for phrase, t in zip(phrases, tokens, strict=True):
            if not t:
                raise ValueError(f"--{FLAG} {self.kind}: the phrase {phrase!r} has no tokens ({self.path})")
        inputs = self.processor(images=image, text=text, return_tensors="pt")
        outputs = self.model(**self._to_device(inputs))
        s = self.settings
        result = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=s.score_threshold, text_threshold=s.text_threshold,
            target_sizes=[(image.height, image.width)])[0]
        probs = torch.sigmoid(outputs.logits[0])  # queries × text positions, in the model's dtype as there
        kept = probs.max(-1).values > s.score_threshold  # the queries the post-processing kept, in order
        probs = probs.float()
        if int(kept.sum()) != len(result["scores"]):
            raise RuntimeError("GroundingDinoDetector: the processor's post-processing kept other boxes than "
                               "sigmoid(max logit) > threshold; this transformers version is not supported")
        per_phrase = torch.stack([probs[kept][:, t].max(-1).values for t in tokens], -1)  # kept × phrases
        best, which = per_phrase.max(-1)
        return [Detection(tuple(box.float().tolist()), phrases[j], float(score))
                for box, score, b, j in zip(result["boxes"], result["scores"], best.tolist(), which.tolist(),
                                            strict=True)
                if b > s.text_threshold]


def _clean(phrase: str) -> str:
    """A phrase as Grounding DINO reads it: lower case, no full stops (they separate phrases)."""
    return " ".join(phrase.replace(".", " ").lower().split())


def _prompt(phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The prompt ("a cat. a dog.") and the character span of each phrase in it."""
    text, spans = "", []
    for phrase in phrases:
        clean = _clean(phrase)
        start = len(text) + (1 if text else 0)
        text = f"{text} {clean}." if text else f"{clean}."
        spans.append((start, start + len(clean)))
    return text, spans


class Owlv2Detector(_TransformersDetector):
    """OWLv2: each phrase is a text query; a box is labelled with its best-matching query."""

    kind, model_class = OWLV2, "Owlv2ForObjectDetection"

    def _detect(self, image, phrases):
        length = int(self.model.config.text_config.max_position_embeddings)
        inputs = self.processor(images=image, text=[phrases], return_tensors="pt", padding="max_length",
                                truncation=True, max_length=length)
        outputs = self.model(**self._to_device(inputs))
        result = self.processor.image_processor.post_process_object_detection(
            outputs, threshold=self.settings.score_threshold, target_sizes=[(image.height, image.width)])[0]
        return [Detection(tuple(box.float().tolist()), phrases[int(label)], float(score))
                for box, score, label in zip(result["boxes"], result["scores"], result["labels"], strict=True)]


DETECTORS = {GROUNDING_DINO: GroundingDinoDetector, OWLV2: Owlv2Detector}


def load_detector(kind: str, settings: DetectSettings | None = None) -> GroundingDinoDetector | Owlv2Detector:
    """The open-vocabulary detector `kind` (grounding-dino or owlv2) with `settings`."""
    if kind not in DETECTORS:
        raise ValueError(f"--{FLAG} must be one of {sorted(DETECTORS)}, got {kind!r}")
    return DETECTORS[kind](settings)
