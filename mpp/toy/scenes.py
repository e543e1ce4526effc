"""Procedural toy scenes: coloured, textured shapes in boxes on a plain or textured background.

Every scene is a pure function of ``(seed, index)``. Some instances are foreground "characters"
with an :class:`Identity` (shape + texture + palette) shared across scenes, so a reference image
means something; the others are layout-only background elements (plain-colour blocks and blobs).
The characters are drawn from ``identity_seed`` (``seed`` unless given), so held-out layouts of the
same characters come from another ``seed`` with the training world's ``identity_seed``; ``cast``
names them explicitly instead (e.g. characters no training world shows).

A character's caption names its colour, texture and shape ("a teal dotted cross") unless
``describe_prob`` < 1: then each appearance names only the shape ("a cross") with probability
1 − ``describe_prob``, as a real caption says "a man" and leaves who he is to the reference image.

Frames are square (``image_size``²) unless ``frames`` lists (width, height) sizes: each scene then
takes one of them (drawn from the scene's own generator), e.g. :func:`frames_for` of 16:9 and
2.39:1 for widescreen footage, so preparation's aspect-ratio buckets have something to sort.

Colour contract (what an evaluator relies on):
- every instance in a scene has its own main colour (``ToyInstance.color``), drawn exactly (no
  anti-aliasing), and the shapes are drawn to the box extents, so the pixels of that colour fill
  most of the box and their bounding box is the instance box (up to occlusion by later instances);
- textures use a neutral second colour (white or black) that is far from every main colour, and
  background tones are pale and far from every instance colour, so :func:`mpp.evaluate.color_mask`
  segments an instance by its colour alone.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mpp.evaluate import box_iou

__all__ = [
    "Identity",
    "ToyInstance",
    "Scene",
    "ToyWorld",
    "IDENTITY_COLORS",
    "ELEMENT_KINDS",
    "BACKGROUND_TONES",
    "SHAPES",
    "MIN_BOX",
    "MAX_BOX",
    "TEXTURES",
    "all_identities",
    "background",
    "frames_for",
    "identity_from_name",
    "make_identity",
    "overlap_of_smaller",
    "paint_element",
    "paint_identity",
    "reference_image",
]

Color = tuple[int, int, int]

# Saturated main colours for identities (pairwise RGB distance >= 95, and >= 93 from every
# element colour, background tone and texture colour).
IDENTITY_COLORS: dict[str, Color] = {
    "red": (220, 30, 30),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 0),
    "purple": (140, 40, 200),
    "orange": (250, 120, 0),
    "cyan": (0, 200, 220),
    "pink": (245, 90, 190),
    "lime": (140, 220, 20),
    "teal": (0, 130, 130),
    "navy": (20, 20, 120),
}
# Texture colours (Identity.color2): white on dark colours, black on light ones.
TEXTURE_WHITE: Color = (255, 255, 255)
TEXTURE_BLACK: Color = (0, 0, 0)
# Layout-only background elements: (colour word, noun, drawn shape, colour).
ELEMENT_KINDS: tuple[tuple[str, str, str, Color], ...] = (
    ("grey", "block", "rect", (110, 110, 110)),
    ("green", "bush", "blob", (30, 120, 40)),
    ("brown", "crate", "rect", (125, 75, 25)),
)
# Pale background tones; a textured background alternates the tone with a slightly darker one.
BACKGROUND_TONES: dict[str, Color] = {
    "sandy": (215, 190, 140),
    "pale blue": (170, 200, 230),
    "pale green": (190, 220, 170),
}
BACKGROUND_TEXTURES = ("tiled", "striped")
BACKGROUND_DARKEN = 0.92
SHAPES = ("square", "circle", "cross", "hexagon")
# sides of a scene's boxes, in pixels (the default world's)
MIN_BOX, MAX_BOX = 28, 72
TEXTURES = ("solid", "striped", "dotted", "plaid")
_TEXTURE_WORD = {"solid": "", "striped": "striped", "dotted": "dotted", "plaid": "plaid"}
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Identity:
    name: str
    shape: str
    texture: str
    color: Color
    color2: Color
    caption: str

    @property
    def shape_caption(self) -> str:
        """The caption that names only the shape ("a cross"): the looks are left to the reference."""
        return f"a {self.shape}"


@dataclass
class ToyInstance:
    bbox: tuple[int, int, int, int]  # xyxy pixels, x1/y1 exclusive
    caption: str
    foreground: bool
    identity: str | None
    color: Color


@dataclass
class Scene:
    id: str
    image: np.ndarray  # H×W×3 uint8
    caption: str
    instances: list[ToyInstance]


# ----------------------------------------------------------------------------------- helpers


def overlap_of_smaller(a, b) -> float:
    """The intersection of two xyxy boxes over the smaller one's area."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _shape_mask(shape: str, h: int, w: int) -> np.ndarray:
    """Mask of a shape drawn to the full extents of an h×w box (touches all four sides)."""
    v = (np.arange(h, dtype=np.float64) + 0.5)[:, None] / h  # 0..1, pixel centres
    u = (np.arange(w, dtype=np.float64) + 0.5)[None, :] / w
    if shape in ("square", "rect"):
        return np.ones((h, w), dtype=bool)
    if shape in ("circle", "blob"):  # ellipse inscribed in the box (~79% of it)
        m = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "cross":  # plus sign, arms half the box wide (75%)
        m = ((u >= 0.25) & (u <= 0.75)) | ((v >= 0.25) & (v <= 0.75))
    elif shape == "hexagon":  # pointy left/right, corners cut at a quarter width (75%)
        m = np.abs(u - 0.5) <= 0.5 - 0.5 * np.abs(v - 0.5)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    m = np.broadcast_to(m, (h, w)).copy()
    # make sure the shape reaches every side of the box even for tiny boxes
    m[h // 2, :] = True
    m[:, w // 2] = True
    return m


def _texture_mask(texture: str, h: int, w: int) -> np.ndarray:
    """Where the texture's second colour goes, in box-relative coordinates (<= 25% of the box)."""
    v = (np.arange(h, dtype=np.float64) + 0.5)[:, None] / h
    u = (np.arange(w, dtype=np.float64) + 0.5)[None, :] / w
    if texture == "solid":
        m = np.zeros((h, w), dtype=bool)
    elif texture == "striped":  # diagonal stripes, 3 periods, 25% duty
        m = np.mod((u + v) * 3.0, 1.0) < 0.25
    elif texture == "dotted":  # 3×3 dots
        du = np.mod(u * 3.0, 1.0) - 0.5
        dv = np.mod(v * 3.0, 1.0) - 0.5
        m = du * du + dv * dv <= 0.22**2
    elif texture == "plaid":  # thin horizontal + vertical lines
        m = (np.mod(u * 3.0 + 0.5, 1.0) < 0.13) | (np.mod(v * 3.0 + 0.5, 1.0) < 0.13)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return np.broadcast_to(m, (h, w)).copy()


def paint_identity(canvas: np.ndarray, box, ident: Identity) -> None:
    """Draws ``ident`` to the extents of ``box`` (xyxy pixels) on ``canvas`` in place."""
    x0, y0, x1, y1 = box
    h, w = y1 - y0, x1 - x0
    shape = _shape_mask(ident.shape, h, w)
    tex = _texture_mask(ident.texture, h, w) & shape
    # keep the main colour on the box border so its bounding box is the instance box
    tex[0, :] = tex[-1, :] = tex[:, 0] = tex[:, -1] = False
    region = canvas[y0:y1, x0:x1]
    region[shape & ~tex] = ident.color
    region[tex] = ident.color2


def paint_element(canvas: np.ndarray, box, shape: str, color: Color) -> None:
    """Draws a background element's plain ``shape`` (rect or blob) in ``color`` to the extents of ``box``."""
    x0, y0, x1, y1 = box
    canvas[y0:y1, x0:x1][_shape_mask(shape, y1 - y0, x1 - x0)] = color


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _save_png(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    Image.fromarray(array).save(tmp, format="PNG")  # no metadata: same pixels ⇒ same bytes
    os.replace(tmp, path)


def _write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def make_identity(color: str, shape: str, texture: str) -> Identity:
    """The character of one colour × shape × texture combination (name ``color_texture_shape``)."""
    if color not in IDENTITY_COLORS or shape not in SHAPES or texture not in TEXTURES:
        raise ValueError(f"unknown identity {color!r}, {shape!r}, {texture!r}")
    rgb = IDENTITY_COLORS[color]
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    color2 = TEXTURE_BLACK if luminance > 140 else TEXTURE_WHITE
    words = ["a", color] + ([_TEXTURE_WORD[texture]] if _TEXTURE_WORD[texture] else []) + [shape]
    return Identity("_".join([color, texture, shape]), shape, texture, rgb, color2, " ".join(words))


def identity_from_name(name: str) -> Identity:
    """Inverse of ``Identity.name``: ``"pink_dotted_hexagon"`` → that character."""
    parts = name.split("_")
    if len(parts) != 3:
        raise ValueError(f"an identity name is color_texture_shape, got {name!r}")
    return make_identity(parts[0], parts[2], parts[1])


def all_identities() -> list[Identity]:
    """Every colour × shape × texture combination the toy world can draw (the judge's classes)."""
    return [make_identity(c, s, t) for c in IDENTITY_COLORS for s in SHAPES for t in TEXTURES]


def reference_image(ident: Identity, size: int = 64) -> np.ndarray:
    """Canonical render of a character: the shape filling a ``size``×``size`` image on white."""
    image = np.full((size, size, 3), 255, dtype=np.uint8)
    m = max(1, size // 16)
    paint_identity(image, (m, m, size - m, size - m), ident)
    return image


def background(rng: np.random.Generator, height: int, width: int, textured_prob: float = 0.5) -> tuple[np.ndarray, str]:
    """A pale background (plain or textured) of the toy world, and its caption words."""
    tone_name = list(BACKGROUND_TONES)[int(rng.integers(len(BACKGROUND_TONES)))]
    tone = np.array(BACKGROUND_TONES[tone_name], dtype=np.uint8)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = tone
    if rng.random() < textured_prob:
        kind = BACKGROUND_TEXTURES[int(rng.integers(len(BACKGROUND_TEXTURES)))]
        period = int(rng.integers(12, 25))
        yy, xx = np.mgrid[0:height, 0:width]
        if kind == "tiled":
            m = ((yy // period) + (xx // period)) % 2 == 1
        else:  # diagonal stripes of half duty
            m = ((xx + yy) % period) < period // 2
        image[m] = np.round(tone * BACKGROUND_DARKEN).astype(np.uint8)
        return image, f"{tone_name} {kind}"
    return image, tone_name


def frames_for(image_size: int, aspect_ratios: list[float]) -> list[tuple[int, int]]:
    """Frame sizes (width, height) of about ``image_size``² pixels at each aspect ratio (width /
    height), as footage comes: not rounded to any bucket, so preparation resizes and crops them."""
    return [(round(image_size * a**0.5), round(image_size / a**0.5)) for a in aspect_ratios]


# ------------------------------------------------------------------------------------- world


class ToyWorld:
    """A deterministic, infinite set of toy scenes (see module docstring)."""

    def __init__(
        self,
        *,
        image_size: int = 128,
        num_identities: int = 8,
        min_instances: int = 1,
        max_instances: int = 4,
        min_box: int = MIN_BOX,
        max_box: int = MAX_BOX,
        textured_background_prob: float = 0.5,
        seed: int = 0,
        foreground_prob: float = 0.6,
        identity_seed: int | None = None,
        cast: list[str] | None = None,
        frames: list[tuple[int, int]] | None = None,
        describe_prob: float = 1.0,
    ):
        if not 1 <= num_identities <= len(SHAPES) * len(TEXTURES) * len(IDENTITY_COLORS):
            raise ValueError(f"num_identities must be in [1, {len(SHAPES) * len(TEXTURES) * len(IDENTITY_COLORS)}]")
        if not 0.0 <= describe_prob <= 1.0:
            raise ValueError(f"describe_prob must be in [0, 1], got {describe_prob}")
        if not 1 <= min_instances <= max_instances:
            raise ValueError("need 1 <= min_instances <= max_instances")
        self.frames = None if frames is None else [(int(w), int(h)) for w, h in frames]
        if self.frames is not None and not self.frames:
            raise ValueError("frames must list at least one (width, height)")
        smallest = min(min(f) for f in self.frames) if self.frames else image_size
        if not 4 <= min_box <= max_box <= smallest:
            raise ValueError("need 4 <= min_box <= max_box <= the shortest frame side (image_size)")
        self.image_size = int(image_size)
        self.num_identities = int(num_identities)
        self.min_instances = int(min_instances)
        self.max_instances = int(max_instances)
        self.min_box = int(min_box)
        self.max_box = int(max_box)
        self.textured_background_prob = float(textured_background_prob)
        self.seed = int(seed)
        self.identity_seed = self.seed if identity_seed is None else int(identity_seed)
        self.foreground_prob = float(foreground_prob)
        self.describe_prob = float(describe_prob)
        self.cast = None if cast is None else [identity_from_name(n).name for n in cast]
        if self.cast is not None:
            if not self.cast or len(set(self.cast)) != len(self.cast):
                raise ValueError(f"cast must name distinct identities, got {cast}")
            self.num_identities = len(self.cast)
        self.identities: list[Identity] = (
            self._make_identities() if self.cast is None else [identity_from_name(n) for n in self.cast])
        self._by_name = {i.name: i for i in self.identities}

    # ---------------------------------------------------------------- configuration
    @property
    def config(self) -> dict:
        """Constructor arguments (JSON-serialisable); ``ToyWorld(**world.config)`` recreates it.
        ``identity_seed`` appears only when it differs from ``seed``."""
        config = {
            "image_size": self.image_size,
            "num_identities": self.num_identities,
            "min_instances": self.min_instances,
            "max_instances": self.max_instances,
            "min_box": self.min_box,
            "max_box": self.max_box,
            "textured_background_prob": self.textured_background_prob,
            "seed": self.seed,
            "foreground_prob": self.foreground_prob,
        }
        if self.identity_seed != self.seed:
            config["identity_seed"] = self.identity_seed
        if self.cast is not None:
            config["cast"] = list(self.cast)
        if self.frames is not None:
            config["frames"] = [list(f) for f in self.frames]
        if self.describe_prob != 1.0:
            config["describe_prob"] = self.describe_prob
        return config

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"ToyWorld({args})"

    def _make_identities(self) -> list[Identity]:
        rng = np.random.default_rng((self.identity_seed, 0x1D))
        colors = list(IDENTITY_COLORS)
        colors = [colors[i] for i in rng.permutation(len(colors))]
        shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
        textures = [TEXTURES[i] for i in rng.permutation(len(TEXTURES))]
        ns, nt, nc = len(shapes), len(textures), len(colors)
        # Latin square over (shape, texture): the first ns*nt identities are distinct combos and
        # every shape and texture shows up equally often; colours cycle alongside.
        combos = [(shapes[k % ns], textures[(k + k // ns) % nt]) for k in range(ns * nt)]
        period = nc * ns * nt // np.gcd(nc, ns * nt)
        out = []
        for k in range(self.num_identities):
            shape, texture = combos[(k + k // period) % len(combos)]
            out.append(make_identity(colors[k % nc], shape, texture))
        return out

    # ---------------------------------------------------------------- scenes
    def _frame(self, rng: np.random.Generator) -> tuple[int, int]:
        """The scene's (width, height); a draw only when there is a choice, so square worlds keep
        their scenes bit for bit."""
        if self.frames is None:
            return self.image_size, self.image_size
        return self.frames[int(rng.integers(len(self.frames)))] if len(self.frames) > 1 else self.frames[0]

    def _sample_box(self, rng: np.random.Generator, boxes: list, frame: tuple[int, int]
                    ) -> tuple[int, int, int, int] | None:
        fw, fh = frame
        for _ in range(50):
            w = int(rng.integers(self.min_box, self.max_box + 1))
            h = int(rng.integers(self.min_box, self.max_box + 1))
            x0 = int(rng.integers(0, fw - w + 1))
            y0 = int(rng.integers(0, fh - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if all(box_iou(box, b) <= 0.3 and overlap_of_smaller(box, b) <= 0.25 for b in boxes):
                return box
        return None

    def scene(self, index: int) -> Scene:
        """Scene number ``index``: a pure function of ``(seed, index)``."""
        if index < 0:
            raise ValueError("scene index must be >= 0")
        rng = np.random.default_rng((self.seed, int(index)))
        # its own stream, so worlds that describe every character keep their scenes bit for bit
        describe_rng = np.random.default_rng((self.seed, int(index), 0xDE5C))
        frame = self._frame(rng)
        image, bg_words = background(rng, frame[1], frame[0], self.textured_background_prob)
        count = int(rng.integers(self.min_instances, self.max_instances + 1))
        ident_order = rng.permutation(len(self.identities))
        elem_order = rng.permutation(len(ELEMENT_KINDS))
        boxes: list = []
        instances: list[ToyInstance] = []
        used_colors: set[Color] = set()
        ni = ne = 0
        for _ in range(count):
            box = self._sample_box(rng, boxes, frame)
            if box is None:
                break
            foreground = bool(rng.random() < self.foreground_prob)
            # skip identities whose colour is taken (only possible with > 10 identities)
            while ni < len(ident_order) and self.identities[ident_order[ni]].color in used_colors:
                ni += 1
            if foreground and ni >= len(ident_order):
                foreground = False
            if not foreground and ne >= len(elem_order):
                if ni >= len(ident_order):
                    break
                foreground = True
            if foreground:
                ident = self.identities[ident_order[ni]]
                ni += 1
                paint_identity(image, box, ident)
                described = describe_rng.random() < self.describe_prob
                inst = ToyInstance(box, ident.caption if described else ident.shape_caption, True, ident.name,
                                   ident.color)
            else:
                cword, noun, shape, color = ELEMENT_KINDS[elem_order[ne]]
                ne += 1
                paint_element(image, box, shape, color)
                inst = ToyInstance(box, f"a {cword} {noun}", False, None, color)
            used_colors.add(inst.color)
            boxes.append(box)
            instances.append(inst)
        caption = f"{_join([i.caption for i in instances])} on a {bg_words} background"
        return Scene(id=f"{int(index):08d}", image=image, caption=caption, instances=instances)

    def identity(self, name: str) -> Identity:
        return self._by_name[name]

    def reference(self, identity: str, size: int = 64) -> np.ndarray:
        """Canonical render of an identity: the shape filling a ``size``×``size`` image on white."""
        return reference_image(self._by_name[identity], size)

    def vocabulary(self) -> list[str]:
        """Every token any caption can contain (words and the comma), sorted."""
        words = {"a", "and", "on", "background", ","}
        words.update(IDENTITY_COLORS)
        words.update(SHAPES)
        words.update(w for w in _TEXTURE_WORD.values() if w)
        for cword, noun, _, _ in ELEMENT_KINDS:
            words.update((cword, noun))
        for tone in BACKGROUND_TONES:
            words.update(tone.split())
        words.update(BACKGROUND_TEXTURES)
        return sorted(words)

    @staticmethod
    def tokens(caption: str) -> list[str]:
        """Split a caption into vocabulary tokens (words and punctuation), lower-cased."""
        return _TOKEN_RE.findall(caption.lower())

    # ---------------------------------------------------------------- raw dataset
    def write_raw(self, root, num_samples: int, start: int = 0) -> list[str]:
        """Write scenes ``start .. start+num_samples-1`` in DESIGN.md's raw format.

        ``root/images/<id>.png``, ``root/captions/<id>.json`` and ``root/refs/<identity>.png``
        (every identity). Instances carry two extra keys beside the documented ones: ``color``
        (RGB of the instance's main colour, for segmentation-based scoring) and ``identity``.
        """
        root = Path(root)
        for sub in ("images", "captions", "refs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for ident in self.identities:
            _save_png(self.reference(ident.name), root / "refs" / f"{ident.name}.png")
        ids = []
        for index in range(start, start + num_samples):
            scene = self.scene(index)
            _save_png(scene.image, root / "images" / f"{scene.id}.png")
            record = {"caption": scene.caption, "instances": []}
            for inst in scene.instances:
                item = {"bbox": list(inst.bbox), "caption": inst.caption, "foreground": inst.foreground}
                if inst.foreground:
                    item["reference"] = f"refs/{inst.identity}.png"
                item["identity"] = inst.identity
                item["color"] = list(inst.color)
                record["instances"].append(item)
            _write_text(json.dumps(record) + "\n", root / "captions" / f"{scene.id}.json")
            ids.append(scene.id)
        return ids
