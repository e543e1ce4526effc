"""Modulation head: identity code m_k = MLP[d_k, c_k]; per layout block a low-rank projection
(down: random, up: zero-initialized) turns m_k into offsets of the image stream's AdaLN chunks
(6·D for double blocks: shift/scale/gate of msa then mlp; 3·D for single blocks: shift/scale/gate)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def zero_linear(in_dim: int, out_dim: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim, bias=bias)
    nn.init.zeros_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class ModulationHead(nn.Module):
    def __init__(self, clip_dim: int, dino_dim: int, identity_dim: int, inner_dim: int, rank: int,
                 chunks_per_block: list[int]):
        super().__init__()
        self.code = nn.Sequential(
            nn.Linear(dino_dim + clip_dim, identity_dim), nn.SiLU(), nn.Linear(identity_dim, identity_dim)
        )
        self.down = nn.ModuleList(nn.Linear(identity_dim, rank, bias=False) for _ in chunks_per_block)
        self.up = nn.ModuleList(zero_linear(rank, n * inner_dim) for n in chunks_per_block)

    def identity_code(self, dino: Tensor, clip: Tensor) -> Tensor:
        """P×Ddino, P×Dclip → P×identity_dim."""
        return self.code(torch.cat([dino, clip], dim=-1))

    def offsets(self, j: int, code: Tensor) -> Tensor:
        """Offsets of the j-th layout block: P×(chunks·D)."""
        return self.up[j](self.down[j](code))
