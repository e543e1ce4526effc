"""The kohya (sd-scripts) format of an export's LoRA, `lora_kohya.safetensors`, written and read here.

Kohya names FLUX's modules as Black Forest Labs' checkpoints do, where a block's q, k and v are one
`qkv` linear and a single block's q, k, v and MLP input are one `linear1`: mpp's LoRA on
`transformer_blocks.0.attn.to_q` is part of `lora_unet_double_blocks_0_img_attn_qkv`. Each fused
module is written as one LoRA of rank parts × r whose `lora_down` stacks the parts' A (a zero A for a
part mpp does not adapt: the MLP input) and whose `lora_up` is block-diagonal in the parts' B, so
`lora_up @ lora_down` is exactly the stacked per-part deltas: ComfyUI and Forge apply it to the fused
weight, and diffusers' kohya converter recognises the block structure and splits it back into the
parts' own LoRAs. The alpha / r scale is already folded into B (`mpp.export`), so each module's
`.alpha` is its rank and every loader applies scale 1.
"""

from __future__ import annotations

import re

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

KOHYA_NAME = "lora_kohya.safetensors"
PREFIX = "lora_unet_"
MLP_RATIO = 4  # FLUX single blocks: the MLP input is 4 × the attention width (diffusers' FluxSingleTransformerBlock)
# diffusers module inside a block → (kohya module, part, number of parts)
DOUBLE = {"attn.to_q": ("img_attn_qkv", 0, 3), "attn.to_k": ("img_attn_qkv", 1, 3),
          "attn.to_v": ("img_attn_qkv", 2, 3), "attn.to_out.0": ("img_attn_proj", 0, 1),
          "attn.add_q_proj": ("txt_attn_qkv", 0, 3), "attn.add_k_proj": ("txt_attn_qkv", 1, 3),
          "attn.add_v_proj": ("txt_attn_qkv", 2, 3), "attn.to_add_out": ("txt_attn_proj", 0, 1)}
SINGLE = {"attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
          "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1)}
BLOCKS = {"transformer_blocks": ("double_blocks", DOUBLE), "single_transformer_blocks": ("single_blocks", SINGLE)}
_MODULE = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
_KOHYA = re.compile(rf"{PREFIX}(double_blocks|single_blocks)_(\d+)_(.+)")
# (kohya block, kohya module) → (diffusers block, its modules in part order)
_PARTS = {(kohya, name): (block, [m for m, (n, _, _) in sorted(table.items(), key=lambda x: x[1][1]) if n == name])
          for block, (kohya, table) in BLOCKS.items() for name, _, _ in table.values()}


def _kohya_module(module: str) -> tuple[str, int, int]:
    m = _MODULE.fullmatch(module)
    table = BLOCKS[m.group(1)][1] if m else {}
    if not m or m.group(3) not in table:
        raise ValueError(f"the kohya format has no name for the LoRA on {module!r} (only FLUX's double- and "
                         "single-block attention, projections and MLP input)")
    name, part, parts = table[m.group(3)]
    return f"{PREFIX}{BLOCKS[m.group(1)][0]}_{m.group(2)}_{name}", part, parts


def _part_sizes(name: str, width: int) -> list[int]:
    """The output sizes of a fused module's parts, given its attention width."""
    return [width] * 3 + [MLP_RATIO * width] if name.endswith("_linear1") else [width] * 3


def write_kohya(path: str, lora: dict[str, Tensor]) -> None:
    """Writes `lora` (peft's names relative to the transformer, `<module>.lora_A/B.weight`, alpha / r
    folded into B) to `path` in the kohya format (module docstring)."""
    modules: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    fused: set[str] = set()
    for key in sorted(k for k in lora if ".lora_A." in k):
        module = key.split(".lora_A.")[0]
        name, part, parts = _kohya_module(module)
        modules.setdefault(name, {})[part] = (lora[key], lora[f"{module}.lora_B.weight"])
        if parts > 1:
            fused.add(name)
    out: dict[str, Tensor] = {}
    for name, parts in modules.items():
        if name not in fused:
            down, up = parts[0]
        else:
            j0, (a0, b0) = next(iter(parts.items()))
            sizes = _part_sizes(name, width=b0.shape[0] // (MLP_RATIO if j0 == 3 else 1))
            r = a0.shape[0]
            down = torch.zeros(r * len(sizes), a0.shape[1], dtype=a0.dtype)
            up = torch.zeros(sum(sizes), r * len(sizes), dtype=b0.dtype)
            for j, (a, b) in parts.items():
                row = sum(sizes[:j])
                down[j * r:(j + 1) * r] = a
                up[row:row + sizes[j], j * r:(j + 1) * r] = b
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    save_file(out, path, metadata={"format": "pt", "ss_network_module": "networks.lora_flux",
                                   "ss_base_model_version": "flux1", "mpp_scale_folded": "true"})


def read_kohya(path: str) -> dict[str, Tensor]:
    """A kohya-format FLUX LoRA of mpp's modules as peft's names relative to the transformer, alpha /
    rank folded into each B. A fused module's parts come back as their own LoRAs: of rank r where its
    `lora_up` is block-diagonal (as mpp writes it), else of the module's rank, sharing its `lora_down`;
    a part whose B is all zero (the MLP input mpp never adapts) is left out."""
    weights = load_file(path)
    out: dict[str, Tensor] = {}
    for key in sorted(k for k in weights if k.endswith(".lora_down.weight")):
        name = key.removesuffix(".lora_down.weight")
        m = _KOHYA.fullmatch(name)
        if not m or (m.group(1), m.group(3)) not in _PARTS:
            raise ValueError(f"{path}: {name!r} is no FLUX block module mpp's kohya reader knows")
        block, parts = _PARTS[m.group(1), m.group(3)]
        down, up = weights[key], weights[f"{name}.lora_up.weight"]
        scale = float(weights.get(f"{name}.alpha", torch.tensor(float(down.shape[0])))) / down.shape[0]
        split = [(down, up)]
        if len(parts) > 1:
            split = _split(path, name, down, up, len(parts))
        for module, (a, b) in zip(parts, split, strict=True):
            if b.count_nonzero():
                out[f"{block}.{m.group(2)}.{module}.lora_A.weight"] = a.contiguous()
                out[f"{block}.{m.group(2)}.{module}.lora_B.weight"] = (b * scale).contiguous()
    return out


def _split(path: str, name: str, down: Tensor, up: Tensor, n: int) -> list[tuple[Tensor, Tensor]]:
    """A fused module's (A, B) per part: each part's own rows of `down` where `up` is block-diagonal,
    else all of `down` for every part."""
    width = up.shape[0] // (3 + MLP_RATIO) if name.endswith("_linear1") else up.shape[0] // 3
    sizes = _part_sizes(name, width)
    if sum(sizes) != up.shape[0]:
        raise ValueError(f"{path}: {name!r} has {up.shape[0]} outputs, which FLUX's fused {n} parts cannot split")
    bs = torch.split(up, sizes, dim=0)
    if down.shape[0] % n == 0:
        r = down.shape[0] // n
        cols = [b[:, j * r:(j + 1) * r] for j, b in enumerate(bs)]
        if all(b.count_nonzero() == c.count_nonzero() for b, c in zip(bs, cols, strict=True)):
            return [(down[j * r:(j + 1) * r], c) for j, c in enumerate(cols)]
    return [(down, b) for b in bs]
