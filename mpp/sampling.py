"""Sampling a trained `mpp.nn.MppFlux` without Lightning: FLUX's flow-matching Euler schedule, with
optional classifier-free guidance on the layout. Training's image logger, `predict`, `mpp generate`
and the export's Python API all sample through here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mpp.encoders import Encoders
from mpp.flow import euler_sample, shift_for
from mpp.layouts import Layout, encode_layout, save_generated
from mpp.nn import CONDITIONING, DEFAULT_GUIDANCE
from mpp.viz import to_uint8


@dataclass
class SamplingConfig:
    """Euler sampling of logged images and generation.

    Args:
        steps: Euler steps from t = 1 to 0.
        shift: fixed shift of the timesteps (None: none).
        resolution_shift: instead of `shift`, FLUX's shift for the generated image's token count
            (`mpp.flow.resolution_shift`, as FluxPipeline does), so each size gets its own.
        seed: base seed; layout `i` of a generation is sampled from seed + i.
        layout_guidance: classifier-free guidance scale on the layout (1: off); see `sample_latents`.
    """

    steps: int = 28
    shift: float | None = 3.0
    resolution_shift: bool = False
    seed: int = 0
    layout_guidance: float = 1.0


@torch.no_grad()
def sample_latents(model, batch: dict, noise: Tensor, sampling: SamplingConfig, *,
                   guidance: float = DEFAULT_GUIDANCE) -> Tensor:
    """Euler-integrates `model` (an `mpp.nn.MppFlux`) from `noise` for the layouts of `batch`, feeding
    `guidance` to a guidance-distilled backbone.

    `sampling.layout_guidance` s ≠ 1 is classifier-free guidance on the layout: v = v₀ + s·(v − v₀),
    where v₀ is the same model with every instance masked out, which is exactly the backbone (plus
    LoRA where scoped) without mpp's heads. Both run as one batch of twice the size.
    """
    scale = sampling.layout_guidance
    cond = {k: batch[k] for k in CONDITIONING}
    if scale != 1.0:
        cond = {k: torch.cat([v, v]) for k, v in cond.items()}
        n = len(noise)
        cond["instance_mask"] = torch.cat([batch["instance_mask"], torch.zeros_like(batch["instance_mask"])])

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        if scale == 1.0:
            return model(latents=x, timesteps=t, guidance=torch.full_like(t, guidance), **cond).velocity
        t2 = torch.cat([t, t])
        v, v0 = model(latents=torch.cat([x, x]), timesteps=t2, guidance=torch.full_like(t2, guidance),
                      **cond).velocity.split(n)
        return v0 + scale * (v - v0)

    shift = shift_for(tuple(noise.shape[-2:]), sampling.shift, sampling.resolution_shift)
    return euler_sample(velocity, noise, steps=sampling.steps, shift=shift)


@torch.no_grad()
def generate_one(model, encoders: Encoders, layout: Layout, *, sampling: SamplingConfig, index: int,
                 guidance: float = DEFAULT_GUIDANCE) -> tuple[np.ndarray, Tensor, int]:
    """Samples one layout with `model` (an `mpp.nn.MppFlux`) at the layout's width × height from seed
    `sampling.seed + index`. Returns the image (H×W×3 uint8), the predicted α per instance and the seed."""
    device = next(model.parameters()).device
    down = encoders.vae_downsample
    if layout.width % (2 * down) or layout.height % (2 * down):
        raise ValueError(f"layout {layout.id!r}: {layout.width}×{layout.height} is not a multiple of {2 * down} px "
                         f"(this VAE's downsampling {down} × 2×2 packing)")
    shape = (1, model.backbone.config.in_channels // 4, layout.height // down, layout.width // down)
    model.eval()
    batch = encode_layout(encoders, layout)
    seed = sampling.seed + index
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    alpha = model.instance_alpha(batch["boxes"], batch["instance_mask"], batch["clip_embeds"], batch["dino_embeds"],
                                 batch["instance_text"])[0]
    latents = sample_latents(model, batch, noise, sampling, guidance=guidance)
    return to_uint8(encoders.decode_latents(latents)[0]), alpha.cpu(), seed


def generate(model, encoders: Encoders, layouts: list[Layout], out_dir: str, *, sampling: SamplingConfig,
             guidance: float = DEFAULT_GUIDANCE, records: list[dict] | None = None) -> list[dict]:
    """Samples each layout with `model` (an `mpp.nn.MppFlux`, no Lightning needed) at its size, writes
    `<name>.png` and `<name>_boxes.png` (boxes coloured by the predicted α), returns one record each
    (`mpp.layouts.write_report` writes them), appended to `records` as each image is written when given."""
    records = [] if records is None else records
    for i, layout in enumerate(layouts):
        pixels, alpha, seed = generate_one(model, encoders, layout, sampling=sampling, index=i, guidance=guidance)
        records.append(save_generated(pixels, alpha, layout, seed, out_dir))
    return records
