"""The toy identity judge: a small convolutional classifier of a character's colour, shape and
texture, trained on renders. It is what scores identity in ``bench/toy_stages.py``, and it is
deliberately not the toy DINOv2 or CLIP that the identity loss uses (another architecture, trained
apart, on other crops), so a generator cannot score well by fooling the loss's own encoder.

A crop's identity is the (colour, shape, texture) of each head's argmax, one of every combination
of :func:`mpp.toy.scenes.all_identities` (chance 1/160).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mpp.encoders import crop_boxes

from .scenes import IDENTITY_COLORS, SHAPES, TEXTURES, all_identities, identity_from_name
from .vision import codec_round_trip, identity_labels, render_crops, to_tensor

__all__ = ["IdentityJudge", "train_judge", "load_or_train_judge", "JUDGE_SIZE"]

log = logging.getLogger(__name__)

JUDGE_SIZE = 32
ATTRIBUTES = ("color", "shape", "texture")
_CLASSES = (len(IDENTITY_COLORS), len(SHAPES), len(TEXTURES))


class IdentityJudge(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(stage(3, width), stage(width, 2 * width), stage(2 * width, 4 * width),
                                      nn.Flatten(), nn.Linear(4 * width * (JUDGE_SIZE // 8) ** 2, 256), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(256, n) for n in _CLASSES)

    def forward(self, crops: Tensor) -> list[Tensor]:
        """N×3×S×S crops in [-1, 1] (any S) → logits of colour, shape and texture."""
        x = F.interpolate(crops, size=JUDGE_SIZE, mode="bilinear", antialias=True)
        f = self.features(x)
        return [head(f) for head in self.heads]

    @torch.no_grad()
    def predict(self, crops: Tensor) -> Tensor:
        """N×3 (colour, shape, texture) indices."""
        self.eval()
        if not len(crops):
            return torch.zeros(0, 3, dtype=torch.long)
        return torch.stack([logits.argmax(-1) for logits in self(crops)], dim=-1)


def accuracy(judge: IdentityJudge, crops: Tensor, labels: Tensor) -> dict:
    pred = judge.predict(crops)
    out = {a: float((pred[:, j] == labels[:, j]).float().mean()) for j, a in enumerate(ATTRIBUTES)}
    out["identity"] = float((pred == labels).all(-1).float().mean())
    looks = [ATTRIBUTES.index("color"), ATTRIBUTES.index("texture")]
    out["looks"] = float((pred[:, looks] == labels[:, looks]).all(-1).float().mean())
    return out


def train_judge(codec, *, steps: int = 800, batch_size: int = 128, seed: int = 0,
                pool_size: int = 8192) -> tuple[IdentityJudge, dict]:
    """Trains a judge on renders of every combination (half through the codec). Returns it and its
    held-out accuracy per attribute and for the whole identity, on codec round-tripped crops."""
    identities = all_identities()
    torch.manual_seed(seed)
    clean, labels = render_crops(identities, pool_size, np.random.default_rng((seed, 0x7A)))
    clean = to_tensor(clean)
    pool, labels = torch.cat([clean, codec_round_trip(codec, clean)]), torch.cat([labels, labels])
    judge = IdentityJudge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    judge.train()
    for step in range(steps):
        idx = torch.randint(len(pool), (batch_size,), generator=g)
        x = pool[idx] + 0.05 * torch.randn(pool[idx].shape, generator=g)  # generated pixels are noisier
        loss = sum(F.cross_entropy(logits, labels[idx, j]) for j, logits in enumerate(judge(x)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0 or step + 1 == steps:
            log.info("identity judge step %d/%d  loss %.3f", step + 1, steps, loss.item())
    held, held_labels = render_crops(identities, 1600, np.random.default_rng((seed, 0x7B)))
    report = accuracy(judge, codec_round_trip(codec, to_tensor(held)), held_labels)
    report["chance"] = 1 / len(identities)
    return judge.eval(), report


def load_or_train_judge(path, codec, **kw) -> tuple[IdentityJudge, dict]:
    """The judge cached at ``path`` (safetensors; its report in the metadata), trained if absent."""
    path = Path(path)
    if path.exists():
        judge = IdentityJudge()
        judge.load_state_dict(load_file(path))
        with safe_open(str(path), "pt") as f:
            report = json.loads(f.metadata()["report"])
        return judge.eval(), report
    judge, report = train_judge(codec, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(judge.state_dict(), str(tmp), metadata={"report": json.dumps(report)})
    tmp.replace(path)
    return judge, report


def judge_instances(judge: IdentityJudge, images: dict[str, np.ndarray], layouts: dict[str, dict], *,
                    margin: float = 0.1) -> dict:
    """Judges every instance that names its ``"identity"`` (a toy character) in generated images.

    images: id → H×W×3 uint8; layouts: id → {"instances": [{"bbox" (normalized), "identity", …}]}.
    Each box is cropped with ``margin`` of its size on each side, as the judge was trained. Returns
    the instance count, ``identity_accuracy`` (colour, shape and texture all right), the accuracy
    of each attribute, and ``looks_accuracy`` (colour and texture both right: what a reference
    carries where the caption names the shape).
    """
    crops, labels = [], []
    for sid, image in images.items():
        judged = [inst for inst in layouts[sid]["instances"] if inst.get("identity")]
        if not judged:
            continue
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 127.5 - 1.0
        boxes = torch.tensor([[inst["bbox"] for inst in judged]], dtype=torch.float32)
        crops.append(crop_boxes(x, boxes, size=JUDGE_SIZE, margin=margin)[0])
        labels += [identity_labels(identity_from_name(inst["identity"])) for inst in judged]
    if not crops:
        return {"judged": 0}
    report = accuracy(judge, torch.cat(crops), torch.tensor(labels))
    return {"judged": len(labels), "identity_accuracy": report.pop("identity"),
            **{f"{k}_accuracy": v for k, v in report.items()}}
