"""Toy identity crops, and the short pretraining that makes the toy CLIP vision and DINOv2 encoders
*see identity* (DESIGN.md section 7).

Real DINOv2 and CLIP embed a person or a prop the same way wherever it stands, whatever its size
and background; random-initialised toy encoders do not, so the identity loss would pull toward noise.
:func:`pretrain_vision_encoders` trains both toy encoders on crops of toy characters (any of the
world's colour × shape × texture combinations, at random sizes, aspect ratios and offsets, on the
world's backgrounds or on white like a reference, half of them passed through the toy codec as
generated images are) so that their embeddings classify the character: a cosine classifier over
every combination plus one linear head per attribute. The heads are dropped; the encoders are saved
back with ``save_pretrained``. :func:`retrieval_accuracy` scores them: held-out scene crops against the
canonical references of all combinations, top-1 by cosine similarity.
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
    IDENTITY_COLORS,
    SHAPES,
    TEXTURES,
    Identity,
    all_identities,
    background,
    paint_identity,
    reference_image,
)

__all__ = ["CROP_SIZE", "VISION_PRETRAIN_STEPS", "identity_labels", "render_crops", "render_references",
           "pretrain_vision_encoders", "retrieval_accuracy", "codec_round_trip"]

log = logging.getLogger(__name__)

CROP_SIZE = 48  # a multiple of the codec's patch size, so crops can go through it
VISION_PRETRAIN_STEPS = 1500  # per encoder; about four minutes for both on two CPU threads
COLORS = list(IDENTITY_COLORS)


def identity_labels(ident: Identity) -> tuple[int, int, int]:
    """(colour, shape, texture) class indices of a character."""
    color = next(name for name, rgb in IDENTITY_COLORS.items() if rgb == ident.color)
    return COLORS.index(color), SHAPES.index(ident.shape), TEXTURES.index(ident.texture)


def combo_index(labels: Tensor) -> Tensor:
    """…×3 (colour, shape, texture) → index into :func:`mpp.toy.scenes.all_identities`."""
    return (labels[..., 0] * len(SHAPES) + labels[..., 1]) * len(TEXTURES) + labels[..., 2]


def render_crops(identities: list[Identity], count: int, rng: np.random.Generator, *, size: int = CROP_SIZE,
                 reference_prob: float = 0.25) -> tuple[np.ndarray, Tensor]:
    """``count`` crops of characters drawn uniformly from ``identities``: N×size×size×3 uint8 and the
    N×3 (colour, shape, texture) labels. A crop is what preparation and the identity loss see: the
    box with a margin, the character filling 55–95 % of each side at a random offset, on a toy
    background (or, with ``reference_prob``, on white as a reference image is)."""
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.empty((count, 3), dtype=np.int64)
    for i in range(count):
        ident = identities[int(rng.integers(len(identities)))]
        if rng.random() < reference_prob:
            canvas = np.full((size, size, 3), 255, dtype=np.uint8)
        else:
            canvas, _ = background(rng, size, size)
        w = int(rng.integers(int(0.55 * size), int(0.95 * size) + 1))
        h = int(rng.integers(int(0.55 * size), int(0.95 * size) + 1))
        x0 = int(rng.integers(0, size - w + 1))
        y0 = int(rng.integers(0, size - h + 1))
        paint_identity(canvas, (x0, y0, x0 + w, y0 + h), ident)
        images[i] = canvas
        labels[i] = identity_labels(ident)
    return images, torch.from_numpy(labels)


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
    q = F.normalize(torch.cat([embed(queries[i : i + 256]) for i in range(0, len(queries), 256)]), dim=-1)
    r = F.normalize(embed(references), dim=-1)
    return float(((q @ r.T).argmax(-1) == combo_index(query_labels)).float().mean())


def _train(embedder: _Embedder, pool: Tensor, labels: Tensor, *, steps: int, batch_size: int, lr: float,
           g: torch.Generator, name: str) -> None:
    dim = embedder(pool[:1]).shape[-1]
    n_combos = len(COLORS) * len(SHAPES) * len(TEXTURES)
    heads = nn.ModuleDict({"combo": nn.Linear(dim, n_combos, bias=False), "color": nn.Linear(dim, len(COLORS)),
                           "shape": nn.Linear(dim, len(SHAPES)), "texture": nn.Linear(dim, len(TEXTURES))})
    params = list(embedder.model.parameters()) + list(heads.parameters())
    embedder.model.requires_grad_(True).train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    def lr_factor(s: int) -> float:
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    combos = combo_index(labels)
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


def pretrain_vision_encoders(models_dir, *, codec, steps: int = VISION_PRETRAIN_STEPS, batch_size: int = 128,
                             lr: float = 2e-3, seed: int = 0, pool_size: int = 8192) -> dict:
    """Trains ``models_dir/{dino,image_encoder}`` to see identity (module docstring) and saves them back.

    Returns ``{"steps", "dino": {"before", "after"}, "clip": {...}}``: held-out retrieval accuracy
    over every colour × shape × texture combination (chance 1/160) before and after.
    """
    models_dir = Path(models_dir)
    identities = all_identities()
    rng = np.random.default_rng((seed, 0x51))
    log.info("toy vision encoders: rendering %d training crops", pool_size)
    clean, labels = render_crops(identities, pool_size, rng)
    clean = to_tensor(clean)
    # half of each batch as the codec gives images back: the identity loss embeds decoded crops
    pool = torch.cat([clean, codec_round_trip(codec, clean)])
    labels = torch.cat([labels, labels])
    held, held_labels = render_crops(identities, 1600, np.random.default_rng((seed, 0x52)))
    held = codec_round_trip(codec, to_tensor(held))
    refs = to_tensor(render_references(identities))
    g = torch.Generator().manual_seed(seed)
    result: dict = {"steps": int(steps), "chance": 1 / len(identities)}
    for kind, folder in (("dino", "dino"), ("clip", "image_encoder")):
        embedder = _load(models_dir / folder, kind)
        before = retrieval_accuracy(embedder, held, held_labels, refs)
        _train(embedder, pool, labels, steps=steps, batch_size=batch_size, lr=lr, g=g, name=kind)
        after = retrieval_accuracy(embedder, held, held_labels, refs)
        log.info("toy %s: held-out identity retrieval %.3f -> %.3f (chance %.4f)", kind, before, after,
                 result["chance"])
        embedder.model.save_pretrained(models_dir / folder)
        result[kind] = {"before": round(before, 4), "after": round(after, 4)}
    return result

