"""Latent packing (2×2 patches ↔ tokens), position ids and box → token membership.

Token grid convention: a latent of size h×w (even) becomes an (h/2)×(w/2) grid of tokens in
row-major order, token index s = row * (w/2) + col, exactly as diffusers' FluxPipeline packs.
A token is *inside* a box (xyxy, normalized to [0, 1]) when its patch centre lies in the closed box;
the token containing the box centre is always added, so every valid box covers at least one token.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pack_latents(latents: Tensor) -> Tensor:
    """B×C×h×w → B×(h/2·w/2)×(4C)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even, got {h}×{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents`: B×S×(4C) → B×C×height×width (latent resolution)."""
    b, s, d = tokens.shape
    gh, gw = height // 2, width // 2
    if s != gh * gw:
        raise ValueError(f"{s} tokens do not match a {height}×{width} latent")
    x = tokens.view(b, gh, gw, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(grid_h: int, grid_w: int, *, device=None, dtype=torch.float32) -> Tensor:
    """(grid_h·grid_w)×3 ids ``[0, row, col]`` as diffusers' ``_prepare_latent_image_ids``."""
    ids = torch.zeros(grid_h, grid_w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(grid_h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(grid_w, device=device, dtype=dtype)[None, :]
    return ids.reshape(grid_h * grid_w, 3)


def text_ids(length: int, *, device=None, dtype=torch.float32) -> Tensor:
    """length×3 zeros, as FluxPipeline uses for the T5 tokens."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


def token_centres(grid_h: int, grid_w: int, *, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """The normalized (y, x) of the token rows' and columns' patch centres: (gh,), (gw,)."""
    cy = (torch.arange(grid_h, device=device, dtype=dtype) + 0.5) / grid_h
    cx = (torch.arange(grid_w, device=device, dtype=dtype) + 0.5) / grid_w
    return cy, cx


def box_token_mask(boxes: Tensor, grid_h: int, grid_w: int, instance_mask: Tensor | None = None) -> Tensor:
    """B×N×4 boxes (xyxy in [0, 1]) → B×N×S bool, True where the token's patch centre is in the box.

    The token containing the box centre is always included. Padding instances
    (``instance_mask`` False) get an all-False row.
    """
    b, n, _ = boxes.shape
    boxes = boxes.float()
    cy, cx = token_centres(grid_h, grid_w, device=boxes.device)
    x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(4))
    inside_y = (cy[:, None] >= y0) & (cy[:, None] <= y1)  # B×N×gh×1
    inside_x = (cx[None, :] >= x0) & (cx[None, :] <= x1)  # B×N×1×gw
    member = inside_y & inside_x  # B×N×gh×gw
    # the token holding the box centre, so that tiny boxes still own a token
    bc_x = ((boxes[..., 0] + boxes[..., 2]) * 0.5 * grid_w).floor().long().clamp(0, grid_w - 1)
    bc_y = ((boxes[..., 1] + boxes[..., 3]) * 0.5 * grid_h).floor().long().clamp(0, grid_h - 1)
    member = member.reshape(b, n, grid_h * grid_w)
    centre = (bc_y * grid_w + bc_x).unsqueeze(-1)
    member = member.scatter(-1, centre, torch.ones_like(centre, dtype=torch.bool))
    if instance_mask is not None:
        member = member & instance_mask.bool().unsqueeze(-1)
    return member
