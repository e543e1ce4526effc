"""Sampling below Lightning: layout guidance against the same model without instances, identity guidance
against the same model without references."""

import pytest
import torch

from mpp.encoders import embedding_dims
from mpp.layouts import Layout
from mpp.nn import HeadsConfig, MppFlux, build_backbone
from mpp.sampling import SamplingConfig, layout_sampling, sample_latents
from tests.helpers import toy_conditioning


def _model_and_batch(toy_models, toy_settings):
    torch.manual_seed(0)
    model = MppFlux(build_backbone(toy_models), **embedding_dims(toy_settings), heads=HeadsConfig(lora_rank=4)).eval()
    with torch.no_grad():  # give the zero-initialized projections weight, so layout and references change the output
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    batch = toy_conditioning(1, 2, g, txt_len=8)
    noise = torch.randn(1, 16, 16, 16, generator=g)
    return model, batch, noise


def _velocity(model, noise, batch, **changes):
    t = torch.ones(1)
    with torch.no_grad():
        return model(latents=noise, timesteps=t, guidance=torch.full_like(t, 3.5), **{**batch, **changes}).velocity


def test_layout_guidance_extrapolates_from_the_same_model_without_instances(toy_models, toy_settings):
    model, batch, noise = _model_and_batch(toy_models, toy_settings)
    v = _velocity(model, noise, batch)
    v0 = _velocity(model, noise, batch, instance_mask=torch.zeros(1, 2, dtype=torch.bool))
    guided = sample_latents(model, batch, noise, SamplingConfig(steps=1, shift=None, layout_guidance=3.0), guidance=3.5)
    assert (v - v0).abs().max() > 1e-3  # the layout matters, so the check below can fail
    torch.testing.assert_close(guided, noise - (v0 + 3.0 * (v - v0)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout_scale", [1.0, 3.0])
def test_identity_guidance_extrapolates_from_the_same_model_without_references(toy_models, toy_settings, layout_scale):
    model, batch, noise = _model_and_batch(toy_models, toy_settings)
    v = _velocity(model, noise, batch)
    v_r = _velocity(model, noise, batch, clip_embeds=torch.zeros_like(batch["clip_embeds"]),
                    dino_embeds=torch.zeros_like(batch["dino_embeds"]))
    v0 = _velocity(model, noise, batch, instance_mask=torch.zeros(1, 2, dtype=torch.bool))
    sampling = SamplingConfig(steps=1, shift=None, layout_guidance=layout_scale, identity_guidance=5.0)
    guided = sample_latents(model, batch, noise, sampling, guidance=3.5)
    assert (v - v_r).abs().max() > 1e-3  # the references matter
    assert (v_r - v0).abs().max() > 1e-3  # and so does the rest of the layout
    expected = v0 + layout_scale * (v_r - v0) + 5.0 * (v - v_r)
    torch.testing.assert_close(guided, noise - expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flag,value", [("steps", 0), ("layout_guidance", -1.0), ("identity_guidance", -0.5)])
def test_sampling_config_names_the_bad_flag(flag, value):
    with pytest.raises(ValueError, match=f"sampling.{flag}"):
        SamplingConfig(**{flag: value})


def test_a_layout_brings_its_own_seed_and_sampling_values():
    run = SamplingConfig(steps=28, seed=100, layout_guidance=3.0)
    plain = Layout(id="a", prompt="", boxes=torch.zeros(0, 4), captions=[], references=[])
    assert layout_sampling(run, plain, 4) == SamplingConfig(steps=28, seed=104, layout_guidance=3.0)
    own = Layout(id="b", prompt="", boxes=torch.zeros(0, 4), captions=[], references=[], seed=7,
                 sampling={"steps": 4, "identity_guidance": 1.5})
    assert layout_sampling(run, own, 4) == SamplingConfig(steps=4, seed=7, layout_guidance=3.0, identity_guidance=1.5)
