"""Assemble-Attn: per-instance attention over [instance token ∥ image tokens inside its box].

Vectorized over batch and instances, with exact work: the in-box tokens of the P valid (batch,
instance) pairs are packed into one T×… list (T = Σ tokens per box); every linear layer of the branch
runs on those T rows, and attention runs once per *bucket* of pairs with similar box sizes
(:func:`plan_buckets`), padded and masked only up to the bucket's longest box. A full-frame background
box therefore never pads seven small boxes to its size (the old single padded call did ~7.5× the exact
attention work there; ``bench/assemble_attn.py``). The image outputs are scattered back with
``index_add_`` and averaged over overlapping boxes (sum / count; tokens outside every box get 0).
Bucketing needs the boxes' token counts on the host: read once per forward, in :func:`build_layout`.

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

# a bucket costs this many attention scores more than its padding would (the per-call overhead of
# gathering, masking and one more SDPA launch), so tiny differences in box size share one call
BUCKET_OVERHEAD = 256 * 256


@dataclass
class Bucket:
    """Pairs whose boxes have similar token counts, attended in one SDPA call padded to ``length``."""

    pairs: Tensor  # G   pair indices (into the P valid pairs)
    length: int  # tokens of the largest box in the bucket
    start: int  # the bucket's range [start, end) in the packed token list
    end: int
    pos: Tensor | None  # G×length positions in [0, end - start), padding slots at 0; None: no padding
    keep: Tensor | None  # G×1×1×(1+length) bool attention mask (instance token first); None: no padding
    unpad: Tensor | None  # (end - start) indices of the real slots in the flattened G·length padded rows

    @property
    def size(self) -> int:
        return self.pairs.shape[0]


@dataclass
class InstanceLayout:
    """Which tokens belong to which valid instance, in the forms the heads need.

    The Assemble-Attn branch works on the *packed* (pair, token) list: the T = Σ count_pair in-box
    tokens of every valid pair, pair after pair in bucket order, tokens in order inside a pair. Linear
    layers run on those T rows only, and attention runs once per bucket (:func:`plan_buckets`).
    """

    member: Tensor  # B×N×S bool, padding rows all False
    pair_b: Tensor  # P   batch index of each valid instance
    pair_k: Tensor  # P   instance index
    count_pair: Tensor  # P   number of tokens in the box (≥ 1)
    count_token: Tensor  # B×S number of valid boxes containing the token
    grid: tuple[int, int]
    token_b: Tensor  # T   batch index of each packed (pair, token) entry
    token_s: Tensor  # T   its token index
    buckets: list[Bucket]
    pair_order: Tensor  # P   the pairs in bucket order (the buckets' ``pairs`` concatenated)
    pair_rank: Tensor  # P   position of each pair in ``pair_order``

    @property
    def num_pairs(self) -> int:
        return self.pair_b.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.member.shape[-1]

    @property
    def num_packed(self) -> int:
        return self.token_b.shape[0]


def plan_buckets(counts: list[int], overhead: int = BUCKET_OVERHEAD) -> list[list[int]]:
    """Groups pair indices by token count so that Σ over buckets of (size·(1 + longest)² + ``overhead``)
    is least: each bucket is padded to its longest box, so a full-frame box never shares a call with
    small ones, while boxes of nearly equal size do. Exact dynamic programme over the pairs sorted by
    count (an optimal grouping of this cost is contiguous in that order); returns buckets, longest first."""
    order = sorted(range(len(counts)), key=lambda i: -counts[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: least cost of the first j pairs (sorted)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # bucket = sorted pairs i..j-1, padded to counts[order[i]]
            cost = best[i] + (j - i) * (1 + counts[order[i]]) ** 2 + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def build_layout(boxes: Tensor, instance_mask: Tensor, grid_h: int, grid_w: int,
                 bucket_overhead: int = BUCKET_OVERHEAD) -> InstanceLayout:
    """Precompute the gather/scatter indices and the attention buckets (:func:`plan_buckets` with
    ``bucket_overhead``) once per forward; it reads the valid pairs and their token counts on the host
    (the syncs of a forward), and builds every other index from those without another."""
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
    counts = count_pair.tolist()
    groups = plan_buckets(counts, bucket_overhead)
    order = [p for g in groups for p in g]
    pair_order = torch.tensor(order, dtype=torch.long, device=device)
    pair_rank = torch.empty_like(pair_order)
    pair_rank[pair_order] = torch.arange(len(order), device=device)
    # packed entries: pairs in bucket order, each pair's in-box tokens in token order. Every index with a
    # data-dependent size is built on the host from the counts already read, so nothing below syncs.
    ordered = [counts[p] for p in order]
    rows = torch.repeat_interleave(torch.arange(len(order)), torch.tensor(ordered, dtype=torch.long))
    slots = torch.cat([torch.arange(c) for c in ordered]) if ordered else torch.zeros(0, dtype=torch.long)
    # stable sort puts each pair's in-box tokens first, in token order
    in_box_first = torch.argsort((~member_p[pair_order]).to(torch.uint8), dim=-1, stable=True)
    rows, slots = rows.to(device), slots.to(device)
    token_s = in_box_first[rows, slots]
    token_b = pair_b[pair_order][rows]
    buckets, start = [], 0
    for g in groups:
        lengths = [counts[p] for p in g]
        length, total = lengths[0], sum(lengths)
        pos = keep = unpad = None
        if total != length * len(g):
            lens = torch.tensor(lengths)
            slot = torch.arange(length)
            valid = slot[None, :] < lens[:, None]
            pos = torch.where(valid, (torch.cumsum(lens, 0) - lens)[:, None] + slot[None, :], 0).to(device)
            keep = torch.cat([valid.new_ones(len(g), 1), valid], 1)[:, None, None, :].to(device)
            unpad = valid.flatten().nonzero().squeeze(1).to(device)
        buckets.append(Bucket(pairs=torch.tensor(g, dtype=torch.long, device=device), length=length, start=start,
                              end=start + total, pos=pos, keep=keep, unpad=unpad))
        start += total
    return InstanceLayout(
        member=member,
        pair_b=pair_b,
        pair_k=pair_k,
        count_pair=count_pair,
        count_token=member.sum(1),
        grid=(grid_h, grid_w),
        token_b=token_b,
        token_s=token_s,
        buckets=buckets,
        pair_order=pair_order,
        pair_rank=pair_rank,
    )


def gather_tokens(x: Tensor, layout: InstanceLayout) -> Tensor:
    """B×S×… → T×…: the packed in-box tokens of every valid pair."""
    return x[layout.token_b, layout.token_s]


def scatter_mean(values: Tensor, layout: InstanceLayout) -> Tensor:
    """T×C packed per-(instance, token) values → B×S×C, averaged over the boxes covering each token."""
    b, s = layout.count_token.shape
    c = values.shape[-1]
    flat = layout.token_b * s + layout.token_s
    out = values.new_zeros(b * s, c).index_add_(0, flat, values)
    denom = layout.count_token.clamp(min=1).to(values.dtype).reshape(-1, 1)
    return (out / denom).view(b, s, c)


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


def _padded(x: Tensor, bucket: Bucket) -> Tensor:
    """The bucket's rows of the packed T×… tensor ``x`` as G×length×… (padding slots repeat a real row)."""
    seg = x[bucket.start:bucket.end]
    if bucket.pos is None:
        return seg.unflatten(0, (bucket.size, bucket.length))
    return seg[bucket.pos]


def _unpadded(y: Tensor, bucket: Bucket) -> Tensor:
    """G×length×… → the bucket's (end − start)×… packed rows."""
    y = y.flatten(0, 1)
    return y if bucket.unpad is None else y[bucket.unpad]


def assemble_sdpa(inst_qkv, img_qkv, rope: tuple[Tensor, Tensor], layout: InstanceLayout,
                  inst_rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Attention of every valid pair over [instance token ∥ its in-box image tokens], one SDPA call per
    bucket of the layout (padding, and with it a mask, only inside a bucket).

    ``inst_qkv``: three P×H×hd (normed), ``img_qkv``: three T×H×hd (normed, packed), ``rope``: (cos, sin)
    T×hd of the packed image tokens, ``inst_rope``: (cos, sin) P×hd of the instance tokens' box centres,
    or None (no position). Returns (instance outputs P×H·hd, packed image outputs T×H·hd).
    """
    iq, ik, iv = inst_qkv
    if inst_rope is not None:
        iq, ik = apply_rope(iq, *inst_rope), apply_rope(ik, *inst_rope)
    gq, gk, gv = img_qkv
    gq, gk = apply_rope(gq, *rope), apply_rope(gk, *rope)
    inst_out, img_out = [], []
    for bucket in layout.buckets:
        q, k, v = (torch.cat([i[bucket.pairs].unsqueeze(1), _padded(g, bucket)], dim=1)
                   for i, g in ((iq, gq), (ik, gk), (iv, gv)))
        out = sdpa(q, k, v, bucket.keep)
        inst_out.append(out[:, 0])
        img_out.append(_unpadded(out[:, 1:], bucket))
    return torch.cat(inst_out)[layout.pair_rank], torch.cat(img_out)


def _gather_img_qkv(attn: nn.Module, layout: InstanceLayout, img_norm: Tensor, img_qkv, add_lora: bool):
    """The packed image tokens' q/k/v linear outputs and, when the base path ran without the adapter,
    plus the LoRA delta on the packed normed tokens only (cheaper than re-projecting everything)."""
    gathered = [gather_tokens(t, layout) for t in img_qkv]
    if add_lora:
        xg = gather_tokens(img_norm, layout)
        gathered = [add_delta(t, m, xg) for t, m in zip(gathered, (attn.to_q, attn.to_k, attn.to_v), strict=True)]
    hd = attn.head_dim
    q, k, v = (split_heads(t, hd) for t in gathered)
    return attn.norm_q(q), attn.norm_k(k), v


def _gather_rope(rope_img: tuple[Tensor, Tensor], layout: InstanceLayout) -> tuple[Tensor, Tensor]:
    cos, sin = rope_img
    return cos[layout.token_s], sin[layout.token_s]


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
    out_inst, out_img = assemble_sdpa(inst_qkv, img, _gather_rope(rope_img, layout), layout, inst_rope)

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
    out_inst, out_img = assemble_sdpa(inst_qkv, img, _gather_rope(rope_img, layout), layout, inst_rope)

    d = out_img.shape[-1]
    out_img = F.linear(out_img, block.proj_out.weight[:, :d])
    contrib = scatter_mean(_head_linear(out_proj, out_img), layout)

    mlp = block.act_mlp(block.proj_mlp(inst_n))
    inst = inst + gate * block.proj_out(torch.cat([out_inst, mlp], dim=-1))
    return contrib, inst
