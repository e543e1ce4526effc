"""The layouts JSONL that generation reads and the report it writes, with their readers.

Each JSONL line: {"id": "shot_12"?, "prompt": "...", "width": 1584?, "height": 656?, "seed": 7?,
"sampling": {"steps": 28, "layout_guidance": 3.0, "identity_guidance": null}?, "instances":
[{"bbox": [x0, y0, x1, y1], "caption": "...", "reference": "refs/actor.png"?}]}. `width` and
`height` (both or neither) are the generated image's size in pixels, multiples of 16 (VAE
downsampling × 2×2 packing, `mpp.data.buckets.UNIT`); without them it is the data.resolution
square. Boxes whose values all lie in [0, 1] are normalized; otherwise they are pixels of the
generated image. References are relative to the JSONL's folder. A line without an id is
`line<N>` (N its 1-based number, five digits). A line's `seed` samples it from that seed instead of
the run's seed + its index, and its `sampling` overrides those of the run's sampling values
(`mpp.sampling.SamplingConfig`) for it alone: a shot list saved by `mpp studio` renders the same
pixels in `mpp generate`.

A generation writes `<name>.png`, `<name>_boxes.png` (boxes coloured by the predicted α; `name` the
id made a plain file name, `mpp.filenames.safe_stem`, both in the report) and `generated.json`: the
checkpoint, the layouts file, one record per image and the layouts file's bad lines. Nothing is
written outside the output folder, and two ids never share a file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mpp.data.buckets import UNIT
from mpp.data.raw import SampleError, check_regular_file, read_image, to_tensor
from mpp.encoders import Encoders, crop_boxes
from mpp.filenames import is_safe_stem, safe_stem
from mpp.viz import draw_boxes

REPORT_NAME = "generated.json"
LINE_SAMPLING_KEYS = ("steps", "layout_guidance", "identity_guidance")


@dataclass
class Layout:
    id: str
    prompt: str
    boxes: Tensor  # N×4 normalized xyxy
    captions: list[str]
    references: list[Tensor | None]  # 3×h×w in [-1, 1]
    name: str = ""  # file name stem of its images (mpp.filenames.safe_stem of the id when empty)
    width: int = 1024  # the generated image's size in pixels
    height: int = 1024
    seed: int | None = None  # its own seed (None: the run's seed + its index)
    sampling: dict = field(default_factory=dict)  # its own values of LINE_SAMPLING_KEYS

    def __post_init__(self):
        self.name = self.name or safe_stem(self.id, "layout")


def _layout_id(data: dict, number: int) -> str:
    return str(data["id"]) if data.get("id") not in (None, "") else f"line{number:05d}"


def _frame_size(data: dict, resolution: int) -> tuple[int, int]:
    """The line's (width, height): its own, checked, or the resolution square."""
    if "width" not in data and "height" not in data:
        return resolution, resolution
    size = data.get("width"), data.get("height")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        raise ValueError(f"'width' and 'height' must both be given as whole pixels, got {size[0]!r} × {size[1]!r}")
    bad = [f"{k} {v}" for k, v in zip(("width", "height"), size, strict=True) if v <= 0 or v % UNIT]
    if bad:
        raise ValueError(f"{' and '.join(bad)} must be a positive multiple of {UNIT} px (VAE downsampling × 2×2 "
                         "packing)")
    return size


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _line_sampling(data: dict) -> tuple[int | None, dict]:
    """The line's own seed and sampling values, checked."""
    seed = data.get("seed")
    if seed is not None and not (_is_int(seed) and seed >= 0):
        raise ValueError(f"'seed' must be a whole number >= 0, got {seed!r}")
    sampling = data.get("sampling") or {}
    if not isinstance(sampling, dict):
        raise ValueError(f"'sampling' must be an object of {', '.join(LINE_SAMPLING_KEYS)}, got {sampling!r}")
    unknown = sorted(set(sampling) - set(LINE_SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"'sampling' has unknown keys {unknown}; it takes {', '.join(LINE_SAMPLING_KEYS)}")
    steps = sampling.get("steps", 1)
    if not (_is_int(steps) and steps >= 1):
        raise ValueError(f"sampling 'steps' must be a whole number >= 1, got {steps!r}")
    for key in ("layout_guidance", "identity_guidance"):
        value = sampling.get(key, 0.0)
        if value is None and key == "identity_guidance":
            continue  # the same as layout_guidance
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and value >= 0):
            raise ValueError(f"sampling {key!r} must be a number >= 0, got {value!r}")
    return seed, dict(sampling)


def parse_layout(data, number: int, *, resolution: int, root: str) -> Layout:
    """One layout (a JSONL line's object, line `number`; references relative to `root`), checked:
    a ValueError says what is wrong with it."""
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
        raise ValueError("needs a string field 'prompt'")
    width, height = _frame_size(data, resolution)
    seed, sampling = _line_sampling(data)
    instances = data.get("instances")
    if not isinstance(instances, list) or not instances:
        raise ValueError("needs a non-empty list 'instances' of boxes")
    boxes, captions, refs = [], [], []
    for k, inst in enumerate(instances):
        bbox = inst.get("bbox") if isinstance(inst, dict) else None
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise ValueError(f"instance {k} needs a 'bbox' of 4 numbers, got {bbox!r}")
        box = [float(v) for v in bbox]
        if not all(math.isfinite(v) for v in box):
            raise ValueError(f"instance {k} bbox {bbox} is not finite")
        if any(v > 1 for v in box):
            box = [v / (width, height)[i % 2] for i, v in enumerate(box)]
            if (box[2] - box[0]) * width < 1 or (box[3] - box[1]) * height < 1:
                raise ValueError(f"instance {k} bbox {bbox} read as pixels (a value above 1) is under one pixel "
                                 "wide or high; normalized boxes lie in [0, 1]")
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"instance {k} bbox {bbox} has zero area")
        if min(box) < 0 or max(box) > 1:
            raise ValueError(f"instance {k} bbox {bbox} lies outside the {width}×{height} image")
        ref = inst.get("reference")
        if ref is not None:
            path = os.path.join(root, ref)
            if not os.path.exists(path):
                raise ValueError(f"instance {k} reference {path} does not exist")
            ref = to_tensor(read_image(path, str(number)))
        boxes.append(box)
        captions.append(str(inst.get("caption", "")))
        refs.append(ref)
    sid = _layout_id(data, number)
    return Layout(id=sid, prompt=data["prompt"], boxes=torch.tensor(boxes), captions=captions, references=refs,
                  name=safe_stem(sid, f"line{number:05d}"), width=width, height=height, seed=seed, sampling=sampling)


def read_layouts(path: str, *, resolution: int) -> tuple[list[Layout], list[str]]:
    """Parses a layouts JSONL; returns the good layouts and one message per bad line ("FILE:N: ...").
    A line without a size is a `resolution` square. Reference paths are relative to the JSONL's
    folder. Each id becomes a safe file name (`Layout.name`); a line whose file name an earlier line
    already has is a bad line."""
    layouts, errors, first = [], [], {}
    root = os.path.dirname(os.path.abspath(path))
    try:
        check_regular_file(path, "layouts")
    except SampleError as e:
        raise ValueError(str(e)) from e
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                layout = parse_layout(json.loads(line), number, resolution=resolution, root=root)
            except (ValueError, json.JSONDecodeError) as e:
                errors.append(f"{path}:{number}: {e}")
                continue
            if layout.name.lower() in first:  # case-insensitive file systems would overwrite it too
                errors.append(f"{path}:{number}: id {layout.id!r} (file name {layout.name}) repeats line "
                              f"{first[layout.name.lower()]}'s; ids must be unique")
                continue
            first[layout.name.lower()] = number
            layouts.append(layout)
    return layouts, errors


@torch.no_grad()
def encode_layout(encoders: Encoders, layout: Layout) -> dict:
    """The conditioning of one layout as a batch of one. An instance without a reference gets zero
    image embeddings: the model's learned null embedding stands in for them."""
    prompt, pooled = encoders.encode_prompts([layout.prompt])
    n = len(layout.captions)
    dims = (encoders.clip_vision.config.projection_dim, encoders.dino.config.hidden_size)
    clip = torch.zeros(n, dims[0], device=encoders.device)
    dino = torch.zeros(n, dims[1], device=encoders.device)
    size = max(encoders.clip_size, encoders.dino_size)
    full = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    for k, ref in enumerate(layout.references):
        if ref is not None:
            crop = crop_boxes(ref[None], full, size=size)[0]
            clip[k] = encoders.clip_image_embeds(crop)[0].float()
            dino[k] = encoders.dino_embeds(crop)[0].float()
    dev = encoders.device
    return {
        "ids": [layout.id], "prompt_embeds": prompt.float(), "pooled_prompt_embeds": pooled.float(),
        "boxes": layout.boxes[None].to(dev), "instance_mask": torch.ones(1, n, dtype=torch.bool, device=dev),
        "instance_text": encoders.encode_texts_pooled(layout.captions)[None].float(),
        "clip_embeds": clip[None], "dino_embeds": dino[None],
    }


def save_generated(pixels: np.ndarray, alpha: Tensor, layout: Layout, seed: int, out_dir: str) -> dict:
    """Writes `<name>.png` and `<name>_boxes.png` (boxes coloured by α; `name` the layout's safe file
    name) to `out_dir`; returns the record that the report lists."""
    if not is_safe_stem(layout.name):
        raise ValueError(f"layout {layout.id!r}: file name {layout.name!r} is not a plain file name")
    os.makedirs(out_dir, exist_ok=True)
    boxes = layout.boxes.cpu()
    Image.fromarray(pixels).save(os.path.join(out_dir, f"{layout.name}.png"))
    Image.fromarray(draw_boxes(pixels, boxes, alpha)).save(os.path.join(out_dir, f"{layout.name}_boxes.png"))
    return {"id": layout.id, "prompt": layout.prompt, "seed": seed, "width": pixels.shape[1],
            "height": pixels.shape[0], "boxes": boxes.tolist(),
            "captions": layout.captions, "alpha": [round(float(a), 4) for a in alpha],
            "image": f"{layout.name}.png", "image_with_boxes": f"{layout.name}_boxes.png"}


def write_report(out_dir: str, records: list[dict], *, checkpoint: str, layouts: str,
                 errors: list[str] | None = None) -> None:
    """Writes `<out_dir>/generated.json`: the checkpoint, the layouts file, one record per image and the
    layouts file's bad lines."""
    report = {"checkpoint": checkpoint, "layouts": layouts, "images": records, "errors": errors or []}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, REPORT_NAME), "w") as f:
        json.dump(report, f, indent=1)


def load_generated(generated_dir: str, layouts_path: str):
    """Reads a generation's report, its images and the layouts they came from (boxes normalized as in
    generation). Returns (images: id → H×W×3 uint8, layouts: id → {"instances": [...]},
    references: reference path → H×W×3 uint8)."""
    with open(os.path.join(generated_dir, REPORT_NAME)) as f:
        report = json.load(f)
    raw = {}
    root = os.path.dirname(os.path.abspath(layouts_path))
    with open(layouts_path) as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                data = json.loads(line)
                raw.setdefault(_layout_id(data, number), data)  # the first of duplicated ids, as generate keeps it
    images, layouts, references = {}, {}, {}
    for record in report["images"]:
        image = np.asarray(Image.open(os.path.join(generated_dir, record["image"])).convert("RGB"))
        images[record["id"]] = image
        insts = raw[record["id"]]["instances"]
        boxes = record["boxes"]
        layouts[record["id"]] = {"instances": [{**inst, "bbox": box} for inst, box in zip(insts, boxes, strict=True)]}
        for inst in insts:
            ref = inst.get("reference")
            if ref and ref not in references:
                references[ref] = np.asarray(Image.open(os.path.join(root, ref)).convert("RGB"))
    return images, layouts, references
