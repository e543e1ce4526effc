"""Sampling a trained `mpp.nn.MppFlux` without Lightning: FLUX's flow-matching Euler schedule, with
optional classifier-free guidance on the layout and on the references. Training's image logger,
`predict`, `mpp generate` and the export's Python API all sample through here."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

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
        identity_guidance: guidance scale on the reference images alone (None: the same as
            `layout_guidance`, which then guides layout and references together); see `sample_latents`.
    """

    steps: int = 28
    shift: float | None = 3.0
    resolution_shift: bool = False
    seed: int = 0
    layout_guidance: float = 1.0
    identity_guidance: float | None = None

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"sampling.steps must be >= 1, got {self.steps}")
        for name in ("layout_guidance", "identity_guidance"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"sampling.{name} must be >= 0, got {value}")


def _without_references(cond: dict) -> dict:
    """The same conditioning with every instance's reference removed (its image embeddings zeroed, so
    the learned null ones stand in, α = 0 and no identity offsets), as for an instance given none."""
    return {**cond, "clip_embeds": torch.zeros_like(cond["clip_embeds"]),
            "dino_embeds": torch.zeros_like(cond["dino_embeds"])}


def _without_instances(cond: dict) -> dict:
    return {**cond, "instance_mask": torch.zeros_like(cond["instance_mask"])}


@torch.no_grad()
def sample_latents(model, batch: dict, noise: Tensor, sampling: SamplingConfig, *,
                   guidance: float = DEFAULT_GUIDANCE) -> Tensor:
    """Euler-integrates `model` (an `mpp.nn.MppFlux`) from `noise` for the layouts of `batch`, feeding
    `guidance` to a guidance-distilled backbone.

    Guidance composes two classifier-free terms (as InstructPix2Pix does for its two conditions):

        v = v₀ + s_l·(v_r − v₀) + s_id·(v − v_r)

    where v is the model with everything, v_r the same without any reference image (each instance
    keeps its box and caption), v₀ without any instance, which is exactly the backbone (plus LoRA
    where scoped) without mpp's heads; s_l is `sampling.layout_guidance`, s_id
    `sampling.identity_guidance`. With s_id = s_l (the default) this is v₀ + s·(v − v₀); a branch
    whose weight comes to 0 is not run, and the others run as one batch.
    """
    s_l = sampling.layout_guidance
    s_id = s_l if sampling.identity_guidance is None else sampling.identity_guidance
    full = {k: batch[k] for k in CONDITIONING}
    branches = [full, _without_references(full), _without_instances(full)]
    weights = [s_id, s_l - s_id, 1 - s_l]
    keep = [i for i, w in enumerate(weights) if w != 0]
    branches, weights = [branches[i] for i in keep], [weights[i] for i in keep]
    cond = {k: torch.cat([c[k] for c in branches]) for k in CONDITIONING}
    n, m = len(noise), len(branches)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        xs, ts = torch.cat([x] * m), torch.cat([t] * m)
        vs = model(latents=xs, timesteps=ts, guidance=torch.full_like(ts, guidance), **cond).velocity.split(n)
        if m == 1:
            return vs[0]
        return sum(w * v for w, v in zip(weights, vs, strict=True))

    shift = shift_for(tuple(noise.shape[-2:]), sampling.shift, sampling.resolution_shift)
    return euler_sample(velocity, noise, steps=sampling.steps, shift=shift)


def layout_sampling(sampling: SamplingConfig, layout: Layout, index: int) -> SamplingConfig:
    """The sampling of layout `index` of a run: the run's values with the layout's own (`Layout.sampling`)
    over them, and its seed: the layout's own, else `sampling.seed + index`."""
    seed = sampling.seed + index if layout.seed is None else layout.seed
    return replace(sampling, **layout.sampling, seed=seed)


@torch.no_grad()
def generate_one(model, encoders: Encoders, layout: Layout, *, sampling: SamplingConfig, index: int,
                 guidance: float = DEFAULT_GUIDANCE) -> tuple[np.ndarray, Tensor, int]:
    """Samples one layout with `model` (an `mpp.nn.MppFlux`) at the layout's width × height with
    `layout_sampling(sampling, layout, index)` (seed `sampling.seed + index` unless the layout has its
    own). Returns the image (H×W×3 uint8), the predicted α per instance and the seed."""
    sampling = layout_sampling(sampling, layout, index)
    device = next(model.parameters()).device
    down = encoders.vae_downsample
    if layout.width % (2 * down) or layout.height % (2 * down):
        raise ValueError(f"layout {layout.id!r}: {layout.width}×{layout.height} is not a multiple of {2 * down} px "
                         f"(this VAE's downsampling {down} × 2×2 packing)")
    shape = (1, model.backbone.config.in_channels // 4, layout.height // down, layout.width // down)
    model.eval()
    batch = encode_layout(encoders, layout)
    seed = sampling.seed
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    alpha = model.instance_alpha(batch["boxes"], batch["instance_mask"], batch["clip_embeds"], batch["dino_embeds"],
                                 batch["instance_text"])[0]
    latents = sample_latents(model, batch, noise, sampling, guidance=guidance)
    return to_uint8(encoders.decode_latents(latents)[0]), alpha.cpu(), seed


def generate(model, encoders: Encoders, layouts: list[Layout], out_dir: str, *, sampling: SamplingConfig,
             guidance: float = DEFAULT_GUIDANCE, records: list[dict] | None = None,
             progress: bool = True) -> list[dict]:
    """Samples each layout with `model` (an `mpp.nn.MppFlux`, no Lightning needed) at its size, writes
    `<name>.png` and `<name>_boxes.png` (boxes coloured by the predicted α), returns one record each
    (`mpp.layouts.write_report` writes them), appended to `records` as each image is written when given.
    Shows a progress bar over the layouts unless `progress` is False."""
    records = [] if records is None else records
    for i, layout in enumerate(tqdm(layouts, desc="generating", unit="image", disable=not progress, mininterval=1.0)):
        pixels, alpha, seed = generate_one(model, encoders, layout, sampling=sampling, index=i, guidance=guidance)
        records.append(save_generated(pixels, alpha, layout, seed, out_dir))
    return records
