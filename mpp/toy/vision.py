"""Toy identity crops, and the short pretraining that makes the toy CLIP vision and DINOv2 encoders
*see identity* (DESIGN.md section 7).

Real DINOv2 and CLIP embed a person or a prop the same way wherever it stands, whatever its size
and background; random-initialised toy encoders do not, so the identity loss would pull toward noise.
:func:`pretrain_vision_encoders` trains both toy encoders on crops of toy characters (at random
sizes, aspect ratios and offsets, on the world's backgrounds or on white like a reference, half of
them passed through the toy codec as generated images are) so that their embeddings classify the
character: a cosine classifier over the characters plus one linear head per attribute. The heads are
dropped; the encoders are saved back with ``save_pretrained``.

The characters are the training world's only (``identities``): like real DINOv2, which never saw a
user's actors labelled, the toy encoders never see a label of a combination that no training scene
shows, so held-out ("unseen") characters test what they generalise to. :func:`retrieval_accuracy`
scores them: held-out crops against the canonical references of all 160 combinations, top-1 by
cosine similarity, separately for the seen characters and the unseen ones.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .scenes import (
    ELEMENT_KINDS,
    IDENTITY_COLORS,
    SHAPES,
    TEXTURES,
    Identity,
    all_identities,
    background,
    overlap_of_smaller,
    paint_element,
    paint_identity,
    reference_image,
)

__all__ = ["CROP_SIZE", "CLUTTER_PROB", "VISION_PRETRAIN_STEPS", "identity_labels", "render_crops", "render_references",
           "pretrain_vision_encoders", "retrieval_accuracy", "retrieval_hits", "codec_round_trip"]

log = logging.getLogger(__name__)

CROP_SIZE = 48  # a multiple of the codec's patch size, so crops can go through it
CLUTTER_PROB = 0.5  # scene crops with neighbours overlapping the character (render_crops)
VISION_PRETRAIN_STEPS = 3000  # per encoder; about 15 minutes for both on two CPU threads (docs/decisions.md)
COLORS = list(IDENTITY_COLORS)


def identity_labels(ident: Identity) -> tuple[int, int, int]:
    """(colour, shape, texture) class indices of a character."""
    color = next(name for name, rgb in IDENTITY_COLORS.items() if rgb == ident.color)
    return COLORS.index(color), SHAPES.index(ident.shape), TEXTURES.index(ident.texture)


def combo_index(labels: Tensor) -> Tensor:
    """…×3 (colour, shape, texture) → index into :func:`mpp.toy.scenes.all_identities`."""
    return (labels[..., 0] * len(SHAPES) + labels[..., 1]) * len(TEXTURES) + labels[..., 2]


def render_crops(identities: list[Identity], count: int, rng: np.random.Generator, *, size: int = CROP_SIZE,
                 reference_prob: float = 0.25, clutter_prob: float = 0.0) -> tuple[np.ndarray, Tensor]:
    """``count`` crops of characters drawn uniformly from ``identities``: N×size×size×3 uint8 and the
    N×3 (colour, shape, texture) labels. A crop is what preparation and the identity loss see: the
    box with a margin, the character filling 55–95 % of each side at a random offset, on a toy
    background (or, with ``reference_prob``, on white as a reference image is). With
    ``clutter_prob``, a crop of a scene also shows one or two neighbours overlapping the character
    as a toy scene lets them (at most a quarter of the smaller box), behind it or in front of it:
    another character or a background element, cut by the crop's edge."""
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.empty((count, 3), dtype=np.int64)
    for i in range(count):
        ident = identities[int(rng.integers(len(identities)))]
        reference = rng.random() < reference_prob
        scene = not reference and clutter_prob > 0  # (without clutter, the crops of earlier versions)
        pad = size // 2 if scene else 0  # neighbours may stand beyond the crop's edge
        if reference:
            canvas = np.full((size, size, 3), 255, dtype=np.uint8)
        else:
            canvas, _ = background(rng, size + 2 * pad, size + 2 * pad)
        w = int(rng.integers(int(0.55 * size), int(0.95 * size) + 1))
        h = int(rng.integers(int(0.55 * size), int(0.95 * size) + 1))
        x0 = pad + int(rng.integers(0, size - w + 1))
        y0 = pad + int(rng.integers(0, size - h + 1))
        box = (x0, y0, x0 + w, y0 + h)
        cluttered = scene and rng.random() < clutter_prob
        neighbours = _neighbours(rng, box, canvas.shape[1], identities) if cluttered else []
        for nbox, paint, front in neighbours:
            if not front:
                paint(canvas, nbox)
        paint_identity(canvas, box, ident)
        for nbox, paint, front in neighbours:
            if front:
                paint(canvas, nbox)
        images[i] = canvas[pad : pad + size, pad : pad + size]
        labels[i] = identity_labels(ident)
    return images, torch.from_numpy(labels)


def _neighbours(rng: np.random.Generator, box, side: int, identities: list[Identity]) -> list:
    """One or two (box, paint, in front) overlapping `box` by at most a quarter of the smaller box
    (the toy scenes' rule), within a `side`-pixel square canvas."""
    out = []
    x0, y0, x1, y1 = box
    for _ in range(int(rng.integers(1, 3))):
        for _attempt in range(20):
            w = int(rng.integers(max(4, (x1 - x0) // 2), x1 - x0 + 1))
            h = int(rng.integers(max(4, (y1 - y0) // 2), y1 - y0 + 1))
            nx = int(rng.integers(max(0, x0 - w), min(side - w, x1) + 1))
            ny = int(rng.integers(max(0, y0 - h), min(side - h, y1) + 1))
            nbox = (nx, ny, nx + w, ny + h)
            if 0.02 < overlap_of_smaller(box, nbox) <= 0.25:
                break
        else:
            continue
        if rng.random() < 0.5:
            other = identities[int(rng.integers(len(identities)))]
            paint = lambda canvas, b, other=other: paint_identity(canvas, b, other)  # noqa: E731
        else:
            _, _, shape, color = ELEMENT_KINDS[int(rng.integers(len(ELEMENT_KINDS)))]
            paint = lambda canvas, b, shape=shape, color=color: paint_element(canvas, b, shape, color)  # noqa: E731
        out.append((nbox, paint, bool(rng.random() < 0.5)))
    return out


def render_references(identities: list[Identity], size: int = 64) -> np.ndarray:
    """Canonical references (as ``ToyWorld.reference`` draws them): N×size×size×3 uint8."""
    return np.stack([reference_image(ident, size) for ident in identities])


def to_tensor(images: np.ndarray) -> Tensor:
    """N×H×W×3 uint8 → N×3×H×W float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def codec_round_trip(codec, images: Tensor, chunk: int = 512) -> Tensor:
    """Images in [-1, 1] encoded and decoded by the toy codec (what a generated image looks like at best)."""
    return torch.cat([codec.decode(codec.encode(images[i : i + chunk])).clamp(-1, 1)
                      for i in range(0, len(images), chunk)])


class _Embedder(nn.Module):
    """An encoder as mpp calls it (``mpp.encoders.Encoders``): resize, normalise, embed."""

    def __init__(self, model: nn.Module, folder: Path, kind: str):
        super().__init__()
        cfg = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
        self.model, self.kind, self.size = model, kind, int(cfg["size"])
        self.register_buffer("mean", torch.tensor(cfg["image_mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["image_std"]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True)
        x = ((x + 1) / 2 - self.mean) / self.std
        if self.kind == "dino":
            return self.model(pixel_values=x).pooler_output
        return self.model(pixel_values=x).image_embeds


def _load(folder: Path, kind: str) -> _Embedder:
    if kind == "dino":
        from transformers import Dinov2Model as cls
    else:
        from transformers import CLIPVisionModelWithProjection as cls
    return _Embedder(cls.from_pretrained(folder, torch_dtype=torch.float32), folder, kind)


@torch.no_grad()
def retrieval_accuracy(embed, queries: Tensor, query_labels: Tensor, references: Tensor) -> float:
    """Top-1 accuracy of each query's nearest reference (cosine) being its own combination;
    ``references`` are those of :func:`all_identities`, in that order."""
    return float(retrieval_hits(embed, queries, query_labels, references).float().mean())


@torch.no_grad()
def retrieval_hits(embed, queries: Tensor, query_labels: Tensor, references: Tensor) -> Tensor:
    """Per query: (combination, colour, shape, texture) of its nearest reference (cosine) right, N×4 bool."""
    q = F.normalize(torch.cat([embed(queries[i : i + 256]) for i in range(0, len(queries), 256)]), dim=-1)
    r = F.normalize(embed(references), dim=-1)
    nearest = (q @ r.T).argmax(-1)
    ref_labels = torch.tensor([identity_labels(i) for i in all_identities()])[nearest]
    return torch.cat([(nearest == combo_index(query_labels))[:, None], ref_labels == query_labels], dim=1)


def _train(embedder: _Embedder, pool: Tensor, labels: Tensor, *, steps: int, batch_size: int, lr: float,
           g: torch.Generator, name: str) -> None:
    dim = embedder(pool[:1]).shape[-1]
    present, combos = torch.unique(combo_index(labels), return_inverse=True)  # only the characters shown
    n_combos = len(present)
    heads = nn.ModuleDict({"combo": nn.Linear(dim, n_combos, bias=False), "color": nn.Linear(dim, len(COLORS)),
                           "shape": nn.Linear(dim, len(SHAPES)), "texture": nn.Linear(dim, len(TEXTURES))})
    params = list(embedder.model.parameters()) + list(heads.parameters())
    embedder.model.requires_grad_(True).train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    def lr_factor(s: int) -> float:
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    bar = tqdm(range(steps), desc=f"toy {name} pretraining", unit="step", mininterval=1.0)
    for step in bar:
        idx = torch.randint(len(pool), (batch_size,), generator=g)
        e = embedder(pool[idx])
        logits = F.normalize(e, dim=-1) @ F.normalize(heads["combo"].weight, dim=-1).T / 0.1
        loss = F.cross_entropy(logits, combos[idx])
        for j, head in enumerate(("color", "shape", "texture")):
            loss = loss + F.cross_entropy(heads[head](e), labels[idx, j])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log.debug("toy %s pretraining step %d/%d  loss %.3f", name, step + 1, steps, loss.item())
    embedder.model.eval().requires_grad_(False)


def pretrain_vision_encoders(models_dir, *, codec, identities: list[Identity], steps: int = VISION_PRETRAIN_STEPS,
                             batch_size: int = 128, lr: float = 2e-3, seed: int = 0, pool_size: int = 8192,
                             clutter_prob: float = CLUTTER_PROB) -> dict:
    """Trains ``models_dir/{dino,image_encoder}`` to see ``identities`` (module docstring) and saves them back.

    Returns ``{"steps", "chance", "seen", "unseen", "dino": {"before", "after", "unseen_before",
    "unseen_after", "after_by_attribute"}, "clip": {...}}``: held-out retrieval accuracy among all 160
    combinations (chance 1/160) of the characters trained on and of the others, before and after.
    """
    models_dir = Path(models_dir)
    names = {i.name for i in identities}
    if not names:
        raise ValueError("pretrain_vision_encoders needs at least one identity")
    unseen = [i for i in all_identities() if i.name not in names]
    rng = np.random.default_rng((seed, 0x51))
    log.info("toy vision encoders: rendering %d training crops of %d characters", pool_size, len(names))
    clean, labels = render_crops(identities, pool_size, rng, clutter_prob=clutter_prob)
    clean = to_tensor(clean)
    # half of each batch as the codec gives images back: the identity loss embeds decoded crops
    pool = torch.cat([clean, codec_round_trip(codec, clean)])
    labels = torch.cat([labels, labels])
    held_sets = {"": render_crops(identities, 1600, np.random.default_rng((seed, 0x52)), clutter_prob=clutter_prob)}
    if unseen:
        held_sets["unseen_"] = render_crops(unseen, 1600, np.random.default_rng((seed, 0x53)),
                                            clutter_prob=clutter_prob)
    held_sets = {k: (codec_round_trip(codec, to_tensor(x)), y) for k, (x, y) in held_sets.items()}
    refs = to_tensor(render_references(all_identities()))
    g = torch.Generator().manual_seed(seed)
    result: dict = {"steps": int(steps), "chance": 1 / len(all_identities()), "seen": len(names),
                    "unseen": len(unseen)}
    for kind, folder in (("dino", "dino"), ("clip", "image_encoder")):
        embedder = _load(models_dir / folder, kind)
        scores = {f"{k}before": retrieval_accuracy(embedder, x, y, refs) for k, (x, y) in held_sets.items()}
        _train(embedder, pool, labels, steps=steps, batch_size=batch_size, lr=lr, g=g, name=kind)
        by_attribute = {}
        for k, (x, y) in held_sets.items():
            hits = retrieval_hits(embedder, x, y, refs).float().mean(0).tolist()
            scores[f"{k}after"] = hits[0]
            by_attribute[k.rstrip("_") or "seen"] = dict(zip(("color", "shape", "texture"),
                                                             (round(h, 4) for h in hits[1:]), strict=True))
        log.info("toy %s: held-out identity retrieval %.3f -> %.3f seen, %.3f -> %.3f unseen (chance %.4f)", kind,
                 scores["before"], scores["after"], scores.get("unseen_before", float("nan")),
                 scores.get("unseen_after", float("nan")), result["chance"])
        embedder.model.save_pretrained(models_dir / folder)
        result[kind] = {k: round(v, 4) for k, v in scores.items()} | {"after_by_attribute": by_attribute}
    return result
