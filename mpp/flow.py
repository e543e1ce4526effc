"""Rectified flow: timestep sampling, the flow-matching loss and the Euler sampler.

Convention (FLUX): x_t = (1 − t)·x0 + t·ε, the model predicts v = ε − x0, t = 1 is pure noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

TIMESTEP_SAMPLERS = ("logit_normal", "uniform")
# FLUX.1's scheduler config (FluxPipeline's calculate_shift): mu linear in the image token count
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """Resolution shift of SD3/FLUX: more steps at high noise for shift > 1."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(image_tokens: int) -> float:
    """FLUX's resolution-dependent shift for an image of `image_tokens` packed tokens, as FluxPipeline
    computes it: mu = calculate_shift(tokens), 0.5 at 256 tokens to 1.15 at 4096 (linear, extrapolated
    beyond), and the scheduler's exponential time shift with mu, which is `shift_timesteps` with
    shift = e^mu (3.16 at 1024×1024, 1.60 at the toy's 128×128)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return math.exp(BASE_SHIFT + slope * (image_tokens - BASE_SEQ_LEN))


def shift_for(latent_hw: tuple[int, int], shift: float | None, by_tokens: bool) -> float | None:
    """The timestep shift of latents of size h×w: FLUX's `resolution_shift` of their token count
    ((h/2)·(w/2)) when `by_tokens`, else the fixed `shift` (None: none)."""
    if by_tokens:
        return resolution_shift((latent_hw[0] // 2) * (latent_hw[1] // 2))
    return shift


def sample_timesteps(n: int, *, generator: torch.Generator, sampler: str = "logit_normal", mean: float = 0.0,
                     std: float = 1.0, shift: float | None = None) -> Tensor:
    if sampler == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    elif sampler == "uniform":
        t = torch.rand(n, generator=generator)
    else:
        raise ValueError(f"loss.timestep_sampler must be one of {TIMESTEP_SAMPLERS}, got {sampler!r}")
    return t if shift is None else shift_timesteps(t, shift)


def noisy_latents(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def predicted_x0(x_t: Tensor, t: Tensor, velocity: Tensor) -> Tensor:
    return x_t - t.view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype) * velocity


def flow_matching_loss(velocity: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """MSE between the predicted and the true flow ε − x0, in float32."""
    return F.mse_loss(velocity.float(), (noise - x0).float())


@torch.no_grad()
def euler_sample(velocity_fn: Callable[[Tensor, Tensor], Tensor], noise: Tensor, *, steps: int = 28,
                 shift: float | None = None) -> Tensor:
    """Integrates dx/dt = v from t = 1 (noise) to t = 0. velocity_fn(x_t, t as a B-vector) → v."""
    ts = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    if shift is not None:
        ts = shift_timesteps(ts, shift)
    x = noise
    for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
        v = velocity_fn(x, t0.expand(x.shape[0]))
        x = x + (t1 - t0) * v.to(x.dtype)
    return x
