"""Modulation head: identity code m_k = MLP[d_k, c_k]; per layout block a low-rank projection
(down: random, up: zero-initialized) turns m_k into offsets of the image stream's AdaLN chunks
(6·D for double blocks: shift/scale/gate of msa then mlp; 3·D for single blocks: shift/scale/gate).

With ``grid`` G > 1 the low-rank code of each box is a G×G map laid over the box and read at each
token's position in it (bilinear, cell centres at (i + ½)/G of the box), so the offsets can draw a
shape inside the box, a face above a coat; G = 1 is one offset for the whole box.

The offsets of the boxes covering a token are weighted by α and averaged, like the layout branch's
output. As ``up`` is linear, that average is taken in the rank-r space and ``up`` applied once per
token: up(Σ α_k·c_k) = W·(Σ α_k·c_k) + b·(Σ α_k), with the sums over boxes divided by their count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .assemble_attn import InstanceLayout
from .packing import token_centres


def zero_linear(in_dim: int, out_dim: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim, bias=bias)
    nn.init.zeros_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def box_coordinates(boxes: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """P×4 xyxy boxes → P×S×2 (x, y) of every token centre in its box's frame, in grid_sample's
    [−1, 1] (−1 the box's left/top edge, +1 its right/bottom edge)."""
    cy, cx = token_centres(grid_h, grid_w, device=boxes.device, dtype=boxes.dtype)
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
    u = (cx[None] - x0) / (x1 - x0).clamp_min(1e-6) * 2 - 1  # P×gw
    v = (cy[None] - y0) / (y1 - y0).clamp_min(1e-6) * 2 - 1  # P×gh
    return torch.stack(torch.broadcast_tensors(u[:, None, :], v[:, :, None]), dim=-1).flatten(1, 2)


@dataclass
class BoxReading:
    """Where and how much each valid pair's offsets land, the same in every layout block of a forward."""

    weight: Tensor  # P×1 α (grid 1), or P×S×1 α on the pair's in-box tokens, 0 elsewhere (grid > 1)
    where: Tensor | None  # P×S×1×2 each token's place in the pair's box (grid > 1)
    inv_count: Tensor  # B×S×1, 1 / the number of boxes covering the token


class ModulationHead(nn.Module):
    def __init__(self, clip_dim: int, dino_dim: int, identity_dim: int, inner_dim: int, rank: int,
                 chunks_per_block: list[int], grid: int = 1):
        super().__init__()
        if grid < 1:
            raise ValueError(f"heads.modulation_grid must be >= 1, got {grid}")
        self.rank, self.grid = rank, grid
        self.code = nn.Sequential(
            nn.Linear(dino_dim + clip_dim, identity_dim), nn.SiLU(), nn.Linear(identity_dim, identity_dim)
        )
        self.down = nn.ModuleList(nn.Linear(identity_dim, rank * grid * grid, bias=False) for _ in chunks_per_block)
        self.up = nn.ModuleList(zero_linear(rank, n * inner_dim) for n in chunks_per_block)

    def identity_code(self, dino: Tensor, clip: Tensor) -> Tensor:
        """P×Ddino, P×Dclip → P×identity_dim."""
        return self.code(torch.cat([dino, clip], dim=-1))

    def reading(self, layout: InstanceLayout, boxes: Tensor, alpha: Tensor) -> BoxReading:
        """What :meth:`offsets` needs of the layout, computed once per forward. ``boxes`` P×4 and
        ``alpha`` P of the layout's valid pairs."""
        dtype = alpha.dtype
        weight = alpha[:, None]
        where = None
        if self.grid > 1:
            where = box_coordinates(boxes.to(dtype), *layout.grid)[:, :, None]
            weight = layout.member[layout.pair_b, layout.pair_k].to(dtype)[..., None] * weight[:, None]
        inv_count = 1 / layout.count_token.clamp(min=1).to(dtype)[..., None]
        return BoxReading(weight, where, inv_count)

    def offsets(self, j: int, code: Tensor, layout: InstanceLayout, reading: BoxReading) -> Tensor:
        """The j-th layout block's offsets on every image token: B×S×(chunks·D), 0 outside every box.
        ``code`` P×identity_dim of the layout's valid pairs."""
        low = self.down[j](code)  # P×(r·G²)
        weight = reading.weight
        if self.grid == 1:
            per_pair = torch.cat([low * weight, weight], dim=-1)  # P×(r+1), the same on every token of the box
            b, n, _ = layout.member.shape
            dense = per_pair.new_zeros(b, n, self.rank + 1).index_put((layout.pair_b, layout.pair_k), per_pair)
            summed = layout.member.to(low.dtype).transpose(1, 2) @ dense  # B×S×(r+1)
        else:
            maps = low.view(-1, self.rank, self.grid, self.grid)
            at_token = F.grid_sample(maps, reading.where, mode="bilinear", padding_mode="border",
                                     align_corners=False).squeeze(-1).transpose(1, 2)  # P×S×r
            per_token = torch.cat([at_token * weight, weight], dim=-1)
            b, s = layout.count_token.shape
            summed = per_token.new_zeros(b, s, self.rank + 1).index_add_(0, layout.pair_b, per_token)
        summed = summed * reading.inv_count
        up = self.up[j]
        return F.linear(summed[..., :self.rank], up.weight) + summed[..., self.rank:] * up.bias
