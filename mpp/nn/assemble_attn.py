"""Assemble-Attn: per-instance attention over [instance token ∥ image tokens inside its box].

Vectorized over batch and instances: the valid (batch, instance) pairs (P of them) are gathered into a
padded P×(1+M) sequence (M = largest number of tokens in one box) with a key-padding mask, attended in
ONE ``scaled_dot_product_attention`` call per block, and the image outputs are scattered back with
``index_add_`` and averaged over overlapping boxes (sum / count; tokens outside every box get 0).

Projections (the block's own weights, always with the LoRA adapter when there is one):

* double blocks: image tokens use ``to_q/k/v`` + ``norm_q/k`` + RoPE of their position and ``to_out``;
  the instance token is treated as a context (text-stream) token: AdaLN ``norm1_context`` with the
  block's context chunks, ``add_q/k/v_proj`` + ``norm_added_q/k``, ``to_add_out``, gated by
  the context ``gate_msa``, then the context feed-forward (``norm2_context``, ``ff_context``, context
  mlp chunks) exactly as a text token would be updated.
* single blocks: image and instance tokens share ``to_q/k/v`` + ``norm_q/k``; image outputs use the
  attention columns of ``proj_out`` (no bias); the instance token gets the full single-block update
  (AdaLN ``norm`` with the block's chunks, parallel MLP, ``proj_out``, gate).

Image tokens carry the RoPE of their position. The instance token carries none, or (``inst_rope``)
the RoPE of its box centre on the same grid, so its attention scores depend on where a token sits
relative to the box rather than on the box's absolute position (InstanceAssemble's choice).

The image outputs then go through the block's zero-initialized projection (the ``layout`` head), are
averaged over boxes, and the caller adds them to the attention output before the block's gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import apply_rope, sdpa, split_heads
from .lora import add_delta, project
from .packing import box_token_mask


@dataclass
class InstanceLayout:
    """Which tokens belong to which valid instance, in the forms the heads need."""

    member: Tensor  # B×N×S bool, padding rows all False
    pair_b: Tensor  # P   batch index of each valid instance
    pair_k: Tensor  # P   instance index
    idx: Tensor  # P×M token indices inside the box (padded with 0)
    key_valid: Tensor  # P×M bool, False = padding
    count_pair: Tensor  # P   number of tokens in the box (≥ 1)
    count_token: Tensor  # B×S number of valid boxes containing the token
    grid: tuple[int, int]

    @property
    def num_pairs(self) -> int:
        return self.pair_b.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.member.shape[-1]


def build_layout(boxes: Tensor, instance_mask: Tensor, grid_h: int, grid_w: int) -> InstanceLayout:
    """Precompute the gather/scatter indices once per forward (one host sync for M)."""
    b, n = instance_mask.shape[:2]
    s = grid_h * grid_w
    device = boxes.device
    if n == 0:
        member = torch.zeros(b, 0, s, dtype=torch.bool, device=device)
    else:
        member = box_token_mask(boxes, grid_h, grid_w, instance_mask)
    pair_b, pair_k = instance_mask.bool().nonzero(as_tuple=True)
    member_p = member[pair_b, pair_k]  # P×S
    count_pair = member_p.sum(-1)
    m = int(count_pair.max()) if pair_b.numel() else 0
    # stable sort puts the in-box tokens first, in token order
    idx = torch.argsort((~member_p).to(torch.uint8), dim=-1, stable=True)[:, :m]
    key_valid = torch.arange(m, device=device)[None, :] < count_pair[:, None]
    idx = torch.where(key_valid, idx, torch.zeros_like(idx))
    return InstanceLayout(
        member=member,
        pair_b=pair_b,
        pair_k=pair_k,
        idx=idx,
        key_valid=key_valid,
        count_pair=count_pair,
        count_token=member.sum(1),
        grid=(grid_h, grid_w),
    )


def gather_tokens(x: Tensor, layout: InstanceLayout) -> Tensor:
    """B×S×C → P×M×C: the tokens inside each valid instance's box (padding slots hold token 0)."""
    return x[layout.pair_b[:, None], layout.idx]


def scatter_mean(values: Tensor, layout: InstanceLayout) -> Tensor:
    """P×M×C per-(instance, token) values → B×S×C, averaged over the boxes covering each token."""
    b, s = layout.count_token.shape
    c = values.shape[-1]
    flat = (layout.pair_b[:, None] * s + layout.idx).reshape(-1)
    vals = (values * layout.key_valid[..., None].to(values.dtype)).reshape(-1, c)
    out = values.new_zeros(b * s, c).index_add_(0, flat, vals)
    denom = layout.count_token.clamp(min=1).to(values.dtype).reshape(-1, 1)
    return (out / denom).view(b, s, c)


def spread_instances(values: Tensor, layout: InstanceLayout, weights: Tensor | None = None) -> Tensor:
    """P×C per-instance values (optionally × ``weights`` P) → B×S×C on the tokens of each box,
    averaged over overlapping boxes; 0 outside every box."""
    b, n, s = layout.member.shape
    if weights is not None:
        values = values * weights[:, None].to(values.dtype)
    dense = values.new_zeros(b, n, values.shape[-1]).index_put((layout.pair_b, layout.pair_k), values)
    member = layout.member.to(values.dtype)
    summed = member.transpose(1, 2) @ dense  # B×S×C
    return summed / layout.count_token.clamp(min=1).to(values.dtype)[..., None]


def box_centre_ids(boxes: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """P×4 normalized xyxy boxes → P×3 RoPE ids ``[0, row, col]`` of their centres on the token grid
    whose token (r, c) has ids ``[0, r, c]`` (fractional where a centre falls between tokens)."""
    x0, y0, x1, y1 = boxes.float().unbind(-1)
    row = (y0 + y1) / 2 * grid_h - 0.5
    col = (x0 + x1) / 2 * grid_w - 0.5
    return torch.stack([torch.zeros_like(row), row, col], dim=-1)


def box_mean(x: Tensor, layout: InstanceLayout) -> Tensor:
    """B×S×C → P×C: mean of the tokens inside each valid instance's box."""
    pooled = layout.member.to(x.dtype) @ x  # B×N×C
    pooled = pooled[layout.pair_b, layout.pair_k]
    return pooled / layout.count_pair.clamp(min=1).to(x.dtype)[:, None]


def _head_linear(module: nn.Module, x: Tensor) -> Tensor:
    """A trainable head applied to a stream tensor: computed in the head's dtype, returned in x's."""
    return module(x.to(module.weight.dtype)).to(x.dtype)


def assemble_sdpa(inst_qkv, img_qkv, rope: tuple[Tensor, Tensor], key_valid: Tensor,
                  inst_rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """One SDPA call over the P padded sequences [instance ∥ in-box image tokens].

    ``inst_qkv``: three P×H×hd (normed), ``img_qkv``: three P×M×H×hd (normed), ``rope``: (cos, sin)
    P×M×hd of the gathered image tokens, ``key_valid``: P×M, ``inst_rope``: (cos, sin) P×hd of the
    instance tokens' box centres, or None (no position). Returns (instance outputs P×H·hd, image
    outputs P×M×H·hd).
    """
    cos, sin = rope
    iq, ik, iv = inst_qkv
    if inst_rope is not None:
        iq, ik = apply_rope(iq, *inst_rope), apply_rope(ik, *inst_rope)
    gq, gk, gv = img_qkv
    gq, gk = apply_rope(gq, cos, sin), apply_rope(gk, cos, sin)
    q = torch.cat([iq.unsqueeze(1), gq], dim=1)
    k = torch.cat([ik.unsqueeze(1), gk], dim=1)
    v = torch.cat([iv.unsqueeze(1), gv], dim=1)
    keep = torch.cat([key_valid.new_ones(key_valid.shape[0], 1), key_valid], dim=1)
    out = sdpa(q, k, v, keep[:, None, None, :])
    return out[:, 0], out[:, 1:]


def _gather_img_qkv(attn: nn.Module, layout: InstanceLayout, img_norm: Tensor, img_qkv, add_lora: bool):
    """Gather the image tokens' q/k/v linear outputs and, when the base path ran without the adapter,
    add the LoRA delta on the gathered normed tokens only (cheaper than re-projecting everything)."""
    gathered = [gather_tokens(t, layout) for t in img_qkv]
    if add_lora:
        xg = gather_tokens(img_norm, layout)
        gathered = [add_delta(t, m, xg) for t, m in zip(gathered, (attn.to_q, attn.to_k, attn.to_v), strict=True)]
    hd = attn.head_dim
    q, k, v = (split_heads(t, hd) for t in gathered)
    return attn.norm_q(q), attn.norm_k(k), v


def _gather_rope(rope_img: tuple[Tensor, Tensor], layout: InstanceLayout) -> tuple[Tensor, Tensor]:
    cos, sin = rope_img
    return cos[layout.idx], sin[layout.idx]


def assemble_double(
    block: nn.Module,
    layout: InstanceLayout,
    img_norm: Tensor,
    img_qkv: tuple[Tensor, Tensor, Tensor],
    inst: Tensor,
    ctx_chunks: tuple[Tensor, ...],
    rope_img: tuple[Tensor, Tensor],
    out_proj: nn.Module,
    add_lora: bool,
    inst_rope: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Assemble-Attn in a ``FluxTransformerBlock``.

    ``img_norm`` B×S×D normed+modulated image tokens, ``img_qkv`` their to_q/k/v outputs (B×S×D each, as
    computed on the base path), ``inst`` P×D instance tokens, ``ctx_chunks`` the six B×D context AdaLN
    chunks (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), ``rope_img`` (cos, sin) S×hd.
    Returns (B×S×D contribution, averaged over boxes, before the block's gate; updated P×D tokens).
    """
    if layout.num_pairs == 0:
        return torch.zeros_like(img_norm), inst
    attn = block.attn
    pb = layout.pair_b
    c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = (c[pb] for c in ctx_chunks)
    inst_n = block.norm1_context.norm(inst) * (1 + c_scale) + c_shift
    inst_qkv = _instance_qkv(inst_n, attn.head_dim, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                             (attn.norm_added_q, attn.norm_added_k))
    img = _gather_img_qkv(attn, layout, img_norm, img_qkv, add_lora)
    out_inst, out_img = assemble_sdpa(inst_qkv, img, _gather_rope(rope_img, layout), layout.key_valid,
                                      inst_rope)

    out_img = attn.to_out[1](project(attn.to_out[0], out_img, True))
    contrib = scatter_mean(_head_linear(out_proj, out_img), layout)

    inst = inst + c_gate * project(attn.to_add_out, out_inst, True)
    inst_n2 = block.norm2_context(inst) * (1 + c_scale_mlp) + c_shift_mlp
    inst = inst + c_gate_mlp * block.ff_context(inst_n2)
    return contrib, inst


def _instance_qkv(inst_n: Tensor, head_dim: int, projections, norms) -> tuple[Tensor, Tensor, Tensor]:
    """Instance-token q, k, v through the given projections (with their LoRA), q and k normed."""
    q, k, v = (split_heads(project(p, inst_n, True), head_dim) for p in projections)
    return norms[0](q), norms[1](k), v


def assemble_single(
    block: nn.Module,
    layout: InstanceLayout,
    img_norm: Tensor,
    img_qkv: tuple[Tensor, Tensor, Tensor],
    inst: Tensor,
    chunks: tuple[Tensor, Tensor, Tensor],
    rope_img: tuple[Tensor, Tensor],
    out_proj: nn.Module,
    add_lora: bool,
    inst_rope: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Assemble-Attn in a ``FluxSingleTransformerBlock``; ``chunks`` = the block's (shift, scale, gate) B×D.

    Same arguments and results as :func:`assemble_double` (image tensors are the image part of the
    single stream only).
    """
    if layout.num_pairs == 0:
        return torch.zeros_like(img_norm), inst
    attn = block.attn
    pb = layout.pair_b
    shift, scale, gate = (c[pb] for c in chunks)
    inst_n = block.norm.norm(inst) * (1 + scale) + shift
    inst_qkv = _instance_qkv(inst_n, attn.head_dim, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
    img = _gather_img_qkv(attn, layout, img_norm, img_qkv, add_lora)
    out_inst, out_img = assemble_sdpa(inst_qkv, img, _gather_rope(rope_img, layout), layout.key_valid,
                                      inst_rope)

    d = out_img.shape[-1]
    out_img = F.linear(out_img, block.proj_out.weight[:, :d])
    contrib = scatter_mean(_head_linear(out_proj, out_img), layout)

    mlp = block.act_mlp(block.proj_mlp(inst_n))
    inst = inst + gate * block.proj_out(torch.cat([out_inst, mlp], dim=-1))
    return contrib, inst
