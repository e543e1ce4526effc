"""Attention primitives shared by mpp's block forward and the Assemble-Attn branch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on ``x`` (..., S, H, hd) with ``cos``/``sin`` (..., S, hd), FLUX's interleaved pairs.

    Same formula as diffusers' ``apply_rotary_emb(use_real=True, repeat_interleave_real=True)``,
    computed in float32.
    """
    cos = cos.unsqueeze(-2)
    sin = sin.unsqueeze(-2)
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def split_heads(x: Tensor, head_dim: int) -> Tensor:
    """(..., D) → (..., H, hd)."""
    return x.unflatten(-1, (-1, head_dim))


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Attention on (B, S, H, hd) tensors; returns (B, S, H·hd). ``mask``: bool, True = attend."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2).to(q.dtype)
