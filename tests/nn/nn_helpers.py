"""Helpers for the mpp.nn tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mpp.nn import MppFlux, flux_velocity

CONF = Path(__file__).resolve().parents[1] / "conf" / "tiny_flux.json"
DIMS = {"clip_dim": 12, "dino_dim": 10, "text_dim": 8}
LORA_RANK = 4
TXT_LEN = 6


def load_tiny_config() -> dict:
    return json.loads(CONF.read_text())


def random_boxes(gen: torch.Generator, b: int, n: int) -> torch.Tensor:
    """Random xyxy boxes in [0, 1]; some touch the border, some are tiny."""
    a = torch.rand(b, n, 2, generator=gen)
    c = torch.rand(b, n, 2, generator=gen)
    boxes = torch.cat([torch.minimum(a, c), torch.maximum(a, c)], dim=-1)
    if n > 1:
        boxes[:, 0] = torch.tensor([0.0, 0.0, 0.6, 1.0])  # touches three borders
    if n > 2:
        boxes[:, 1] = torch.tensor([0.4, 0.3, 1.0, 0.8])  # overlaps box 0, right border
    if n > 3:
        c0 = torch.rand(b, 2, generator=gen) * 0.9
        boxes[:, 3] = torch.cat([c0, c0 + 0.01], dim=-1)  # smaller than a token
    return boxes


def plain_forward(backbone, inputs: dict) -> torch.Tensor:
    """The plain backbone (diffusers' own forward) on `make_inputs`' inputs, B×C×h×w."""
    return flux_velocity(backbone, inputs["latents"], inputs["timesteps"], inputs["prompt_embeds"],
                         inputs["pooled_prompt_embeds"], guidance=float(inputs["guidance"][0]))


def make_inputs(seed: int = 0, b: int = 2, n: int = 3, h: int = 12, w: int = 16, mask=None, boxes=None) -> dict:
    """Random MppFlux.forward keyword arguments for the tiny config (64 in-channels → 16 latent channels)."""
    gen = torch.Generator().manual_seed(seed)
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool)
        if n > 1:
            mask[0, -1] = False  # one padding slot in the first sample
    if boxes is None:
        boxes = random_boxes(gen, b, n)
    return {
        "latents": torch.randn(b, 16, h, w, generator=gen),
        "timesteps": torch.rand(b, generator=gen),
        "prompt_embeds": torch.randn(b, TXT_LEN, 32, generator=gen),
        "pooled_prompt_embeds": torch.randn(b, 32, generator=gen),
        "boxes": boxes,
        "instance_mask": mask,
        "instance_text": torch.randn(b, n, DIMS["text_dim"], generator=gen),
        "clip_embeds": torch.randn(b, n, DIMS["clip_dim"], generator=gen),
        "dino_embeds": torch.randn(b, n, DIMS["dino_dim"], generator=gen),
        "guidance": torch.full((b,), 3.5),
    }


@torch.no_grad()
def randomize(model: MppFlux, groups=("layout", "modulation", "feedback", "lora"), scale: float = 0.3, seed: int = 1):
    """Give the zero-initialized projections (and LoRA B) random values so the heads do something."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    if "layout" in groups:
        params += list(model.layout_proj.parameters())
    if "modulation" in groups:
        params += list(model.modulation.up.parameters())
    if "feedback" in groups:
        params += list(model.feedback.parameters())
    if "lora" in groups:
        params += [p for n, p in model.backbone.named_parameters() if ".lora_B." in n]
    for p in params:
        p.copy_(torch.randn(p.shape, generator=gen) * scale)
