"""Alpha predictor: α_k = r_k · σ(MLP[c_k, d_k, geom(b_k)]) ∈ [0, 1), identity-bearing foreground
(high) versus layout-only background element (low), where r_k is 1 when the instance's reference
reached the heads and 0 when it is missing or dropped (its embeddings are the learned null ones).

Without a reference there is no identity to keep, so α is 0 by construction rather than by what the
MLP makes of the null embeddings; the MLP only separates referenced instances (and is trained only
on them). Learned, that split generalised badly: trained on a few characters' references against the
null point, the MLP put unseen characters' references on either side (docs/decisions.md)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

GEOM_DIM = 9


def box_geometry(boxes: Tensor) -> Tensor:
    """…×4 xyxy in [0, 1] → …×9: x0, y0, x1, y1, centre x, centre y, width, height, area."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    w, h = (x1 - x0), (y1 - y0)
    return torch.stack([x0, y0, x1, y1, (x0 + x1) / 2, (y0 + y1) / 2, w, h, w * h], dim=-1)


class AlphaPredictor(nn.Module):
    def __init__(self, clip_dim: int, dino_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(clip_dim + dino_dim + GEOM_DIM, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, 1),
        )

    def forward(self, clip: Tensor, dino: Tensor, boxes: Tensor) -> Tensor:
        """P×Dclip, P×Ddino, P×4 → P logits; α = σ(logit). The supervised loss takes the logit
        (BCE with logits is autocast-safe, BCE on σ is not)."""
        x = torch.cat([clip, dino, box_geometry(boxes)], dim=-1)
        return self.mlp(x).squeeze(-1)


def gate_alpha(logit: Tensor, has_reference: Tensor) -> Tensor:
    """P logits and P bool → α: σ(logit) where the reference reached the heads, 0 elsewhere."""
    return torch.sigmoid(logit) * has_reference.to(logit.dtype)
