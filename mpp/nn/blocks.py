"""mpp's forward of FLUX's double- and single-stream blocks.

Same computation as diffusers' ``FluxTransformerBlock.forward`` / ``FluxSingleTransformerBlock.forward``
(with the FluxAttnProcessor inlined), plus three hooks:

* ``img_offsets``: per-token offsets added to the image stream's AdaLN chunks (B×S×6D for double
  blocks in the order shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp; B×S×3D for
  single blocks: shift, scale, gate; text tokens of a single block get none);
* ``assemble``: the Assemble-Attn branch, whose averaged output is added to the image attention
  output before the block's (per-token) gate_msa;
* ``lora_in_base``: whether the base path uses the LoRA adapter (scope "all") or the frozen
  projections only (scope "layout").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .assemble_attn import InstanceLayout, assemble_double, assemble_single
from .attention import apply_rope, sdpa, split_heads
from .lora import project


@dataclass
class AssembleInput:
    layout: InstanceLayout
    inst: Tensor  # P×D instance tokens
    out_proj: nn.Module  # the block's zero-initialized projection (layout head)
    rope: tuple[Tensor, Tensor] | None = None  # (cos, sin) P×hd of the box centres, or None: no position


def _qkv(attn: nn.Module, x: Tensor, with_lora: bool, added: bool = False):
    names = ("add_q_proj", "add_k_proj", "add_v_proj") if added else ("to_q", "to_k", "to_v")
    return tuple(project(getattr(attn, n), x, with_lora) for n in names)


def _clip16(x: Tensor) -> Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def double_block_forward(
    block: nn.Module,
    img: Tensor,
    txt: Tensor,
    temb: Tensor,
    rope: tuple[Tensor, Tensor],
    *,
    lora_in_base: bool = True,
    img_offsets: Tensor | None = None,
    assemble: AssembleInput | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Returns (txt, img, updated instance tokens or None)."""
    attn = block.attn
    hd = attn.head_dim
    txt_len = txt.shape[1]

    emb = block.norm1.linear(F.silu(temb))[:, None]  # B×1×6D
    if img_offsets is not None:
        emb = emb + img_offsets.to(emb.dtype)  # B×S×6D
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=-1)
    img_norm = block.norm1.norm(img) * (1 + scale_msa) + shift_msa

    ctx = block.norm1_context.linear(F.silu(temb)).chunk(6, dim=1)  # six B×D
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = ctx
    txt_norm = block.norm1_context.norm(txt) * (1 + c_scale_msa[:, None]) + c_shift_msa[:, None]

    img_qkv = _qkv(attn, img_norm, lora_in_base)
    txt_qkv = _qkv(attn, txt_norm, lora_in_base, added=True)
    q = torch.cat([attn.norm_added_q(split_heads(txt_qkv[0], hd)), attn.norm_q(split_heads(img_qkv[0], hd))], 1)
    k = torch.cat([attn.norm_added_k(split_heads(txt_qkv[1], hd)), attn.norm_k(split_heads(img_qkv[1], hd))], 1)
    v = torch.cat([split_heads(txt_qkv[2], hd), split_heads(img_qkv[2], hd)], 1)
    cos, sin = rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = sdpa(q, k, v)
    txt_out, img_out = out[:, :txt_len], out[:, txt_len:]
    img_out = attn.to_out[1](project(attn.to_out[0], img_out.contiguous(), lora_in_base))
    txt_out = project(attn.to_add_out, txt_out.contiguous(), lora_in_base)

    inst = None
    if assemble is not None:
        contrib, inst = assemble_double(
            block, assemble.layout, img_norm, img_qkv, assemble.inst, ctx,
            (cos[txt_len:], sin[txt_len:]), assemble.out_proj, add_lora=not lora_in_base, inst_rope=assemble.rope,
        )
        img_out = img_out + contrib

    img = img + gate_msa * img_out
    img_norm2 = block.norm2(img) * (1 + scale_mlp) + shift_mlp
    img = img + gate_mlp * block.ff(img_norm2)

    txt = txt + c_gate_msa.unsqueeze(1) * txt_out
    txt_norm2 = block.norm2_context(txt) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    txt = txt + c_gate_mlp.unsqueeze(1) * block.ff_context(txt_norm2)
    return _clip16(txt), img, inst


def single_block_forward(
    block: nn.Module,
    img: Tensor,
    txt: Tensor,
    temb: Tensor,
    rope: tuple[Tensor, Tensor],
    *,
    lora_in_base: bool = True,
    img_offsets: Tensor | None = None,
    assemble: AssembleInput | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Returns (txt, img, updated instance tokens or None)."""
    attn = block.attn
    hd = attn.head_dim
    txt_len = txt.shape[1]
    x = torch.cat([txt, img], dim=1)

    base = block.norm.linear(F.silu(temb))  # B×3D
    emb = base[:, None]
    if img_offsets is not None:
        pad = img_offsets.new_zeros(img_offsets.shape[0], txt_len, img_offsets.shape[-1])
        emb = emb + torch.cat([pad, img_offsets], dim=1).to(emb.dtype)
    shift, scale, gate = emb.chunk(3, dim=-1)
    x_norm = block.norm.norm(x) * (1 + scale) + shift
    mlp = block.act_mlp(block.proj_mlp(x_norm))

    qkv = _qkv(attn, x_norm, lora_in_base)
    cos, sin = rope
    q = apply_rope(attn.norm_q(split_heads(qkv[0], hd)), cos, sin)
    k = apply_rope(attn.norm_k(split_heads(qkv[1], hd)), cos, sin)
    v = split_heads(qkv[2], hd)
    attn_out = sdpa(q, k, v)
    out = block.proj_out(torch.cat([attn_out, mlp], dim=2))

    inst = None
    if assemble is not None:
        contrib, inst = assemble_single(
            block, assemble.layout, x_norm[:, txt_len:], tuple(t[:, txt_len:] for t in qkv), assemble.inst,
            base.chunk(3, dim=1), (cos[txt_len:], sin[txt_len:]), assemble.out_proj, add_lora=not lora_in_base,
            inst_rope=assemble.rope,
        )
        out = out + torch.cat([contrib.new_zeros(contrib.shape[0], txt_len, contrib.shape[-1]), contrib], 1)

    x = _clip16(x + gate * out)
    return x[:, :txt_len], x[:, txt_len:], inst
