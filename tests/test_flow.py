"""Rectified flow's timestep shift: FLUX's resolution-dependent shift, for training and sampling."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from mpp.flow import euler_sample, resolution_shift, shift_for, shift_timesteps
from mpp.lit_module import Loss, MppModule


@pytest.mark.parametrize("width, height", [(1024, 1024), (1360, 768), (1584, 656), (128, 128), (192, 80)])
def test_resolution_shift_is_flux_pipelines_schedule(width, height):
    tokens = (height // 16) * (width // 16)
    mu = calculate_shift(tokens)
    steps = 8
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # as FluxPipeline calls it
    shift = shift_for((height // 8, width // 8), 3.0, by_tokens=True)
    assert shift == pytest.approx(resolution_shift(tokens)) == pytest.approx(np.exp(mu))
    ours = shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
    torch.testing.assert_close(ours.float(), scheduler.sigmas.float(), rtol=1e-5, atol=1e-6)
    assert shift_for((height // 8, width // 8), 3.0, by_tokens=False) == 3.0


def test_sampling_and_training_follow_the_token_count_when_asked():
    seen = []

    def velocity(x, t):
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    for hw in ((16, 16), (10, 24)):
        euler_sample(velocity, torch.zeros(1, 4, *hw), steps=2, shift=shift_for(hw, None, True))
    assert seen[1] == pytest.approx(shift_timesteps(torch.tensor(0.5), resolution_shift(64)).item())
    assert seen[3] == pytest.approx(shift_timesteps(torch.tensor(0.5), resolution_shift(60)).item())

    by_tokens = MppModule(stage=1, loss=Loss(shift=3.0, resolution_shift=True))
    fixed, unshifted = MppModule(stage=1, loss=Loss(shift=3.0)), MppModule(stage=1, loss=Loss(shift=None))
    for shape, tokens in (((4, 16, 16, 16), 64), ((4, 16, 10, 24), 60), ((4, 16, 128, 128), 4096)):
        def t_of(module, shape=shape):
            return module._noise_and_t(torch.zeros(shape), torch.Generator().manual_seed(0))[1]
        torch.testing.assert_close(t_of(by_tokens), shift_timesteps(t_of(unshifted), resolution_shift(tokens)))
        torch.testing.assert_close(t_of(fixed), shift_timesteps(t_of(unshifted), 3.0))
