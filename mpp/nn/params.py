"""Trainable-parameter report per group; ``python -m mpp.nn.params`` reports the real FLUX.1-dev config
(built on the meta device, so nothing is allocated or downloaded)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from .config import HeadsConfig
from .model import MppFlux

# diffusers' FluxTransformer2DModel config of black-forest-labs/FLUX.1-dev
FLUX_DEV_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
REAL_ENCODER_DIMS = {"clip_dim": 768, "dino_dim": 1024, "text_dim": 768}


def count_parameters(params: Iterable[nn.Parameter]) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def parameter_report(model) -> dict:
    """{"groups": {group: count}, "heads_total", "backbone" (frozen FLUX weights, LoRA excluded), "ratio"}."""
    groups = model.parameter_groups()
    counts = {g: count_parameters(ps) for g, ps in groups.items()}
    lora_ids = {id(p) for p in groups["lora"]}
    backbone = count_parameters(p for p in model.backbone.parameters() if id(p) not in lora_ids)
    heads = count_parameters(p for ps in groups.values() for p in ps)
    return {"groups": counts, "heads_total": heads, "backbone": backbone, "ratio": heads / max(backbone, 1)}


def format_report(report: dict) -> str:
    lines = [f"{'group':<18}{'parameters':>16}"]
    for g, n in report["groups"].items():
        lines.append(f"{g:<18}{n:>16,}")
    lines.append(f"{'heads total':<18}{report['heads_total']:>16,}")
    lines.append(f"{'backbone (frozen)':<18}{report['backbone']:>16,}")
    lines.append(f"{'heads / backbone':<18}{report['ratio']:>16.2%}")
    return "\n".join(lines)


def build_flux_dev(device: str | torch.device = "meta", heads: HeadsConfig | None = None) -> MppFlux:
    """MppFlux around the real FLUX.1-dev transformer config with the real encoder widths."""
    with torch.device(device):
        backbone = FluxTransformer2DModel.from_config(FLUX_DEV_CONFIG)
        return MppFlux(backbone, **REAL_ENCODER_DIMS, heads=heads)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="mpp params", description=__doc__)
    parser.add_argument("--lora_rank", type=int, default=128)
    parser.add_argument("--lora_scope", default="layout", choices=["layout", "all"])
    args = parser.parse_args(argv)
    model = build_flux_dev(heads=HeadsConfig(lora_rank=args.lora_rank, lora_scope=args.lora_scope))
    report = parameter_report(model)
    print(f"FLUX.1-dev transformer, LoRA rank {args.lora_rank} scope {args.lora_scope}, "
          f"layout blocks {model.layout_blocks}")
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()
