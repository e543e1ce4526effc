"""Sampling below Lightning: layout guidance against the same model without instances."""

import torch

from mpp.encoders import embedding_dims
from mpp.nn import HeadsConfig, MppFlux, build_backbone
from mpp.sampling import SamplingConfig, sample_latents
from tests.helpers import toy_conditioning


def test_layout_guidance_extrapolates_from_the_same_model_without_instances(toy_models, toy_settings):
    torch.manual_seed(0)
    model = MppFlux(build_backbone(toy_models), **embedding_dims(toy_settings), heads=HeadsConfig(lora_rank=4)).eval()
    with torch.no_grad():  # give the zero-initialized projections weight, so the layout changes the output
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    batch = toy_conditioning(1, 2, g, txt_len=8)
    noise = torch.randn(1, 16, 16, 16, generator=g)
    t = torch.ones(1)
    with torch.no_grad():
        v = model(latents=noise, timesteps=t, guidance=torch.full_like(t, 3.5), **batch).velocity
        v0 = model(latents=noise, timesteps=t, guidance=torch.full_like(t, 3.5),
                   **{**batch, "instance_mask": torch.zeros(1, 2, dtype=torch.bool)}).velocity
    guided = sample_latents(model, batch, noise, SamplingConfig(steps=1, shift=None, layout_guidance=3.0), guidance=3.5)
    assert (v - v0).abs().max() > 1e-3  # the layout matters, so the check below can fail
    torch.testing.assert_close(guided, noise - (v0 + 3.0 * (v - v0)), rtol=1e-4, atol=1e-5)
