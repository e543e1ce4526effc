"""Instance encoder and the learned null embeddings for missing or dropped modalities.

A modality (CLIP image embed, DINO embed, caption text embed) is *missing* for an instance when its
vector is all zeros; it is then replaced by a learned null vector of the same (raw) width before any
head sees it, so the alpha predictor, instance encoder and modulation head all use the substituted
inputs. In training mode the reference (CLIP and DINO together, as generation without a reference
image lacks both) and the caption of each instance are also dropped independently with probability
``modality_dropout``; the caption of an instance whose reference was kept with ``referenced_caption_dropout``
(when set), so that the reference alone has to carry the appearance of those instances.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def fourier_features(boxes: Tensor, num_freqs: int) -> Tensor:
    """…×4 boxes → …×(4 + 8·num_freqs): the coordinates and sin/cos(2^f·π·coord)."""
    freqs = (2.0 ** torch.arange(num_freqs, device=boxes.device, dtype=boxes.dtype)) * math.pi
    angles = boxes[..., None] * freqs  # …×4×F
    return torch.cat([boxes, angles.sin().flatten(-2), angles.cos().flatten(-2)], dim=-1)


class NullEmbeddings(nn.Module):
    def __init__(self, clip_dim: int, dino_dim: int, text_dim: int, modality_dropout: float = 0.1,
                 referenced_caption_dropout: float | None = None):
        super().__init__()
        for name, p in (("modality_dropout", modality_dropout),
                        ("referenced_caption_dropout", referenced_caption_dropout)):
            if p is not None and not 0.0 <= p <= 1.0:
                raise ValueError(f"heads.{name} must be in [0, 1], got {p}")
        self.modality_dropout = modality_dropout
        self.referenced_caption_dropout = referenced_caption_dropout
        self.clip = nn.Parameter(torch.randn(clip_dim) * 0.02)
        self.dino = nn.Parameter(torch.randn(dino_dim) * 0.02)
        self.text = nn.Parameter(torch.randn(text_dim) * 0.02)

    def _dropped(self, x: Tensor, p: float | Tensor) -> Tensor:
        if self.training:
            return torch.rand(x.shape[0], device=x.device) < p
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)

    @staticmethod
    def _fill(x: Tensor, null: Tensor, dropped: Tensor) -> Tensor:
        missing = (x == 0).all(dim=-1) | dropped
        return torch.where(missing[:, None], null.to(x.dtype)[None], x)

    def forward(self, clip: Tensor, dino: Tensor, text: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """P×D inputs → the same with missing/dropped rows replaced by the null vectors, and a P bool:
        whether the instance's reference (both image embeddings) reached the heads."""
        dropped = self._dropped(clip, self.modality_dropout)
        kept = ~(dropped | (clip == 0).all(dim=-1) | (dino == 0).all(dim=-1))
        p_text = self.modality_dropout
        if self.referenced_caption_dropout is not None:
            p_text = torch.where(kept, self.referenced_caption_dropout, self.modality_dropout)
        return (self._fill(clip, self.clip, dropped), self._fill(dino, self.dino, dropped),
                self._fill(text, self.text, self._dropped(text, p_text)), kept)


class InstanceEncoder(nn.Module):
    """e_k = MLP[Fourier(b_k), t_k, (1−α_k)·P_clip(c_k) + α_k·P_dino(d_k)] → one token of width ``inner_dim``."""

    def __init__(self, clip_dim: int, dino_dim: int, text_dim: int, inner_dim: int, fourier_freqs: int = 8):
        super().__init__()
        self.fourier_freqs = fourier_freqs
        self.proj_clip = nn.Linear(clip_dim, inner_dim)
        self.proj_dino = nn.Linear(dino_dim, inner_dim)
        in_dim = 4 + 8 * fourier_freqs + text_dim + inner_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, inner_dim), nn.SiLU(), nn.Linear(inner_dim, inner_dim))

    def forward(self, boxes: Tensor, text: Tensor, clip: Tensor, dino: Tensor, alpha: Tensor) -> Tensor:
        a = alpha[:, None]
        image = (1 - a) * self.proj_clip(clip) + a * self.proj_dino(dino)
        x = torch.cat([fourier_features(boxes, self.fourier_freqs), text, image], dim=-1)
        return self.mlp(x)
