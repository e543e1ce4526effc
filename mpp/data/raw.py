"""The raw layout (DESIGN.md section 2), written and read here: `<root>/images/<id>.<ext>` +
`<root>/captions/<id>.json`, references relative to `<root>`. `write_raw_sample` is what every way in
(`mpp annotate`, `mpp synth`, `mpp import`, the toy world) writes; `load_raw_sample` reads and validates."""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mpp.data.buckets import bucket_name, fit_to_bucket, nearest_bucket

log = logging.getLogger(__name__)

MAX_UPSCALE = 8  # an image is refused when fitting it to its bucket would enlarge it more than this
MIN_KEPT = 0.75  # a warning names an image whose crop to its bucket keeps less than this share of it

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


class SampleError(ValueError):
    """A bad input sample. The message names the file and what is wrong with it."""

    def __init__(self, sample_id: str, message: str):
        super().__init__(sample_id, message)
        self.sample_id, self.message = sample_id, message

    def __str__(self) -> str:  # args hold both, so that the error pickles (to and from DataLoader workers)
        return self.message


@dataclass
class RawSample:
    id: str
    image: Tensor  # 3×H×W in [-1, 1], H×W its bucket
    caption: str
    boxes: Tensor  # N×4 normalized xyxy in the prepared image
    instance_captions: list[str]
    foreground: list[bool | None]
    references: list[Tensor | None]  # 3×h×w in [-1, 1], or None: the box crop is the reference
    reference_paths: list[str | None]
    source_size: tuple[int, int]  # (width, height) of the source image
    bucket: tuple[int, int] = (0, 0)  # (width, height) of the prepared image
    dropped: list[int] = field(default_factory=list)  # source instances that left the frame in the crop
    clipped: list[int] = field(default_factory=list)  # source instances the crop cut but kept


def list_sample_ids(root: str) -> list[tuple[str, str]]:
    """Sorted (id, image path) pairs under root/images; two images with one id are an error."""
    folder = os.path.join(root, "images")
    if not os.path.isdir(folder):
        raise ValueError(f"source {root!r} has no images/ folder")
    found: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTS:
            continue
        if stem in found:
            raise ValueError(f"sample id {stem!r} has two images: {found[stem]} and {os.path.join(folder, name)}")
        found[stem] = os.path.join(folder, name)
    return sorted(found.items())


def write_raw_sample(root: str, sample_id: str, image: Image.Image | np.ndarray, caption: str,
                     instances: list[dict], *, ext: str = ".png", extra: dict | None = None) -> str:
    """Writes one sample of the raw layout; returns its caption file's path. `instances`: dicts with
    `bbox` (xyxy pixels of `image`), `caption`, and optionally `foreground` and `reference` (a path
    relative to `root`) and any extra keys (kept in the JSON). The image is written first and the
    caption file last, each through a temporary file and a rename, so a sample whose caption file
    exists is complete (`raw_sample_done`) and a killed writer leaves no half sample behind.

    Raises SampleError (naming the sample) for a box outside the image or of zero area, and ValueError
    for an id that is not a plain file name."""
    if not sample_id or os.path.basename(sample_id) != sample_id or sample_id.startswith("."):
        raise ValueError(f"sample id {sample_id!r} must be a plain file name")
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    width, height = image.size
    where = f"sample {sample_id!r}"
    for k, inst in enumerate(instances):
        _check_box(inst.get("bbox"), k, width, height, where, sample_id)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "captions"), exist_ok=True)
    image_path = os.path.join(root, "images", f"{sample_id}{ext}")
    tmp = f"{image_path}.part"  # not an image extension: list_sample_ids never lists it
    image.convert("RGB").save(tmp, format=Image.registered_extensions()[ext.lower()])
    os.replace(tmp, image_path)
    record = {"caption": caption, "instances": instances, **(extra or {})}
    caption_path = os.path.join(root, "captions", f"{sample_id}.json")
    with open(f"{caption_path}.tmp", "w", encoding="utf-8") as f:
        json.dump(record, f)
        f.write("\n")
    os.replace(f"{caption_path}.tmp", caption_path)
    return caption_path


def raw_sample_done(root: str, sample_id: str) -> bool:
    """True when `write_raw_sample` finished `sample_id` in `root` (its caption file exists)."""
    return os.path.isfile(os.path.join(root, "captions", f"{sample_id}.json"))


MAX_FILE_BYTES = 512 * 2**20  # an image or caption file larger than this is refused, not read


def check_regular_file(path: str, sample_id: str, limit: int = MAX_FILE_BYTES) -> None:
    """Raises SampleError unless `path` is a regular file (following links) of at most `limit` bytes:
    opening a FIFO or a device would block or never end, and a huge file would fill the memory."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise SampleError(sample_id, f"{path}: cannot be read ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise SampleError(sample_id, f"{path}: not a regular file (a FIFO, device, socket or folder)")
    if st.st_size > limit:
        raise SampleError(sample_id, f"{path}: {st.st_size} bytes, more than the {limit} an input may have")


def read_image(path: str, sample_id: str) -> Image.Image:
    check_regular_file(path, sample_id)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SampleError(sample_id, f"{path}: unreadable image ({e})") from e


def to_tensor(image: Image.Image) -> Tensor:
    arr = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)


def _read_caption(path: str, sample_id: str) -> dict:
    if not os.path.exists(path):
        raise SampleError(sample_id, f"{path}: missing caption file for sample {sample_id!r}")
    check_regular_file(path, sample_id)
    try:
        with open(path, encoding="utf-8") as f:  # JSON is UTF-8
            data = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: malformed JSON or not UTF-8
        raise SampleError(sample_id, f"{path}: unreadable caption file ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("caption"), str):
        raise SampleError(sample_id, f"{path}: needs a string field 'caption'")
    if not isinstance(data.get("instances", []), list):
        raise SampleError(sample_id, f"{path}: 'instances' must be a list")
    return data


def _check_box(bbox, k: int, width: int, height: int, path: str, sample_id: str) -> list[float]:
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise SampleError(sample_id, f"{path}: instance {k} bbox must be 4 numbers [x0, y0, x1, y1], got {bbox!r}")
    x0, y0, x1, y1 = (float(v) for v in bbox)
    if not all(np.isfinite([x0, y0, x1, y1])):
        raise SampleError(sample_id, f"{path}: instance {k} bbox {bbox} is not finite")
    if x1 <= x0 or y1 <= y0:
        raise SampleError(sample_id, f"{path}: instance {k} bbox {bbox} has zero area")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise SampleError(sample_id, f"{path}: instance {k} bbox {bbox} lies outside the image ({width}×{height})")
    return [x0, y0, x1, y1]


def load_raw_sample(root: str, sample_id: str, image_path: str, *, resolution: int,
                    buckets: list[tuple[int, int]] | None = None, require_instances: bool = True) -> RawSample:
    """Reads and validates one sample and fits it to the bucket of the nearest aspect ratio
    (`mpp.data.buckets`; `buckets` None: the resolution×resolution square) with a minimal centre
    crop. Boxes follow the image; an instance is dropped only when it leaves the frame
    (`Fit.box`), and a box the crop cuts is clipped and kept.

    Raises SampleError naming the file for an unreadable image, an image that its bucket would
    enlarge more than MAX_UPSCALE times, a missing or malformed (or not UTF-8) caption file, a box
    outside the image or of zero area, an unreadable reference, or (when `require_instances`) an
    empty instance list. Warns about an image whose crop keeps less than MIN_KEPT of it.
    """
    caption_path = os.path.join(root, "captions", f"{sample_id}.json")
    data = _read_caption(caption_path, sample_id)
    image = read_image(image_path, sample_id)
    width, height = image.size
    fit = fit_to_bucket(width, height, nearest_bucket(width, height, buckets or [(resolution, resolution)]))
    if fit.scale > MAX_UPSCALE:
        raise SampleError(sample_id, f"{image_path}: {width}×{height} is too small for its bucket "
                                     f"{bucket_name(fit.bucket)} at resolution {resolution} (enlarged "
                                     f"{fit.scale:.1f}×, at most {MAX_UPSCALE}×)")
    if fit.kept < MIN_KEPT:
        log.warning("%s: %d×%d has no bucket near its aspect ratio; the crop to %s keeps %.0f%% of it", image_path,
                    width, height, bucket_name(fit.bucket), 100 * fit.kept)
    instances = data.get("instances", [])
    if require_instances and not instances:
        raise SampleError(sample_id, f"{caption_path}: empty instance list (data.require_instances is set)")

    (bw, bh), (nw, nh) = fit.bucket, fit.resized
    cropped = image.resize((nw, nh), Image.BICUBIC).crop((fit.left, fit.top, fit.left + bw, fit.top + bh))
    boxes, captions, foreground, references, ref_paths, dropped, clipped = [], [], [], [], [], [], []
    for k, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise SampleError(sample_id, f"{caption_path}: instance {k} must be an object")
        placed = fit.box(_check_box(inst.get("bbox"), k, width, height, caption_path, sample_id))
        if placed is None:
            dropped.append(k)
            continue
        box, cut = placed
        if cut:
            clipped.append(k)
        ref_rel = inst.get("reference")
        ref = None
        if ref_rel is not None:
            ref_path = os.path.join(root, ref_rel)
            if not os.path.exists(ref_path):
                raise SampleError(sample_id, f"{caption_path}: instance {k} reference {ref_path} does not exist")
            ref = to_tensor(read_image(ref_path, sample_id))
        fg = inst.get("foreground")
        boxes.append(box)
        captions.append(str(inst.get("caption", "")))
        foreground.append(None if fg is None else bool(fg))
        references.append(ref)
        ref_paths.append(ref_rel)
    if require_instances and not boxes:
        raise SampleError(sample_id, f"{caption_path}: every instance leaves the frame in the crop to "
                                     f"{bucket_name(fit.bucket)}")
    return RawSample(
        id=sample_id, image=to_tensor(cropped), caption=data["caption"],
        boxes=torch.tensor(np.array(boxes), dtype=torch.float32).reshape(-1, 4),
        instance_captions=captions, foreground=foreground, references=references,
        reference_paths=ref_paths, source_size=(width, height), bucket=fit.bucket, dropped=dropped,
        clipped=clipped,
    )
