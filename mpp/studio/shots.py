"""A shot as `mpp studio` edits it, and the shot list as the layouts JSONL that `mpp generate` reads.

A shot is a frame (width × height in pixels, multiples of 16), a prompt, its sampling (seed, steps,
layout and identity guidance) and its boxes, each with a caption and an optional reference image.
A box with a reference is a foreground instance (α is predicted for it); one without is a
background element, placed by its caption alone (DESIGN.md section 1).

The shot list is written as one `mpp.layouts` line per shot: boxes normalized to the frame (six
decimals, so a box is never misread as pixels), the seed and sampling values on the line (so
`mpp generate` samples each shot as the studio did), the references relative to the file, and
the studio's own keys (`plate`: the image the boxes were drawn on) beside them, which
`mpp generate` ignores. A shot is checked by parsing that line with `mpp.layouts.parse_layout`, so
the studio refuses exactly what `mpp generate` would skip.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from mpp.data.buckets import UNIT, Buckets
from mpp.data.layout import atomic_write
from mpp.layouts import Layout, parse_layout

__all__ = ["FRAME_RATIOS", "ShotBox", "Shot", "frame_presets", "shot_line", "check_shot", "write_shot_list",
           "read_shot_list"]

# the frames a post-production team asks for: square, HD/UHD, flat and scope
FRAME_RATIOS = {"1:1": 1.0, "16:9": 16 / 9, "1.85:1 (flat)": 1.85, "2.39:1 (scope)": 2.39}


def frame_presets(resolution: int, training_buckets: list[tuple[int, int]] | None = None) -> dict[str, tuple[int, int]]:
    """Preset name → (width, height): each ratio of `FRAME_RATIOS` at about resolution² pixels (as the
    training buckets are sized, `mpp.data.buckets`), then each training bucket by name."""
    presets = {}
    for name, ratio in FRAME_RATIOS.items():
        (w, h), = Buckets(aspect_ratios=[ratio], portrait=False).resolve(resolution)
        presets[f"{name}  {w}×{h}"] = (w, h)
    for w, h in training_buckets or []:
        presets.setdefault(f"training bucket  {w}×{h}", (int(w), int(h)))
    return presets


@dataclass
class ShotBox:
    """One box of a shot: `bbox` is x0, y0, x1, y1 in pixels of the frame; `reference` a path to an
    image (absolute, or relative to the shot list it was read from)."""

    bbox: list[float]
    caption: str = ""
    reference: str | None = None

    @property
    def role(self) -> str:
        return "foreground" if self.reference else "background"


@dataclass
class Shot:
    """One shot of the list (module docstring). `steps`, `layout_guidance` and `identity_guidance`
    left at None take the model's sampling values."""

    id: str
    prompt: str
    width: int
    height: int
    boxes: list[ShotBox] = field(default_factory=list)
    seed: int = 0
    steps: int | None = None
    layout_guidance: float | None = None
    identity_guidance: float | None = None
    plate: str | None = None  # the image the boxes were drawn on (not used in generation)


def _relative(path: str | None, root: str) -> str | None:
    if not path:
        return None
    return os.path.relpath(os.path.abspath(path), os.path.abspath(root)).replace(os.sep, "/")


def shot_line(shot: Shot, root: str) -> dict:
    """The layouts-JSONL object of a shot whose file lives in folder `root`."""
    sampling = {k: getattr(shot, k) for k in ("steps", "layout_guidance", "identity_guidance")
                if getattr(shot, k) is not None}
    size = (shot.width, shot.height)
    line = {"id": shot.id, "prompt": shot.prompt, "width": shot.width, "height": shot.height, "seed": shot.seed,
            "instances": [{"bbox": [round(float(v) / size[i % 2], 6) for i, v in enumerate(b.bbox)],
                           "caption": b.caption,
                           **({"reference": _relative(b.reference, root)} if b.reference else {})}
                          for b in shot.boxes]}
    if sampling:
        line["sampling"] = sampling
    if shot.plate:
        line["plate"] = _relative(shot.plate, root)
    return line


def check_shot(shot: Shot, root: str) -> Layout:
    """The layout `mpp generate` reads from the shot's line in a file in `root`; a ValueError says
    what is wrong (a box outside the frame or of zero size, a size not a multiple of 16, an
    unreadable reference, ...)."""
    if not shot.id.strip():
        raise ValueError("the shot needs an id")
    if not shot.boxes:
        raise ValueError(f"shot {shot.id!r}: draw at least one box")
    for k, box in enumerate(shot.boxes):
        x0, y0, x1, y1 = box.bbox
        if not (0 <= x0 and 0 <= y0 and x1 <= shot.width and y1 <= shot.height):
            raise ValueError(f"shot {shot.id!r}: box {k + 1} {[round(v, 1) for v in box.bbox]} lies outside the "
                             f"{shot.width}×{shot.height} frame")
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise ValueError(f"shot {shot.id!r}: box {k + 1} {[round(v, 1) for v in box.bbox]} has zero size")
    if shot.width % UNIT or shot.height % UNIT or shot.width <= 0 or shot.height <= 0:
        raise ValueError(f"shot {shot.id!r}: the frame {shot.width}×{shot.height} must be a positive multiple of "
                         f"{UNIT} px on each side (VAE downsampling × 2×2 packing)")
    try:
        return parse_layout(shot_line(shot, root), 1, resolution=shot.width, root=root)
    except ValueError as e:
        raise ValueError(f"shot {shot.id!r}: {e}") from e


def write_shot_list(path: str, shots: list[Shot]) -> None:
    """Writes the shots to `path` (layouts JSONL; references relative to its folder), atomically."""
    root = os.path.dirname(os.path.abspath(path))
    ids = [s.id for s in shots]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"shot ids must be unique; repeated: {repeated}")
    text = "".join(json.dumps(shot_line(s, root)) + "\n" for s in shots)

    def write(f):
        f.write(text.encode("utf-8"))

    atomic_write(path, write)


def _absolute(root: str, path: str | None) -> str | None:
    return os.path.normpath(os.path.join(root, path)) if path else None


def _shot_from_line(data: dict, index: int, root: str, layout: Layout) -> Shot:
    sampling = data.get("sampling") or {}
    boxes = [ShotBox(bbox=[round(float(v) * (layout.width, layout.height)[i % 2], 2) for i, v in enumerate(box)],
                     caption=caption, reference=_absolute(root, inst.get("reference")))
             for box, caption, inst in zip(layout.boxes.tolist(), layout.captions, data["instances"], strict=True)]
    return Shot(id=layout.id, prompt=layout.prompt, width=layout.width, height=layout.height, boxes=boxes,
                seed=index if layout.seed is None else layout.seed, steps=sampling.get("steps"),
                layout_guidance=sampling.get("layout_guidance"), identity_guidance=sampling.get("identity_guidance"),
                plate=_absolute(root, data.get("plate") if isinstance(data.get("plate"), str) else None))


def read_shot_list(path: str, *, resolution: int) -> tuple[list[Shot], list[str]]:
    """Reads a layouts JSONL (a saved shot list or any file `mpp generate` reads) as shots; returns
    them and one message per bad line ("FILE:N: ..."), as `mpp.layouts.read_layouts` does. A line
    without a size is a `resolution` square; one without a seed gets its index among the good lines
    (the seed `mpp generate --seed 0` samples it from)."""
    root = os.path.dirname(os.path.abspath(path))
    shots, errors, seen = [], [], set()
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the shot list ({e})") from e
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            data = json.loads(text)
            layout = parse_layout(data, number, resolution=resolution, root=root)
        except (ValueError, json.JSONDecodeError) as e:
            errors.append(f"{path}:{number}: {e}")
            continue
        if layout.id in seen:
            errors.append(f"{path}:{number}: id {layout.id!r} repeats an earlier line's; ids must be unique")
            continue
        seen.add(layout.id)
        shots.append(_shot_from_line(data, len(shots), root, layout))
    return shots, errors
