"""The toy path of `mpp synth` (``mpp synth PROMPTS RAW --toy MODELS_DIR``): the toy bundle's backbone,
encoders and patch codec render prompts through mpp's own sampler, since FluxPipeline cannot load
the codec (it is not an `AutoencoderKL`)."""

from __future__ import annotations

import os

from mpp.synth import RenderSettings, SamplerRenderer

from .bundle import toy_encoder_settings
from .models import MARKER_NAME


def toy_renderer(models_dir: str | os.PathLike, settings: RenderSettings) -> SamplerRenderer:
    """A `mpp.synth.SamplerRenderer` over the toy bundle in `models_dir` (`mpp toy models DIR` builds one)."""
    models_dir = os.fspath(models_dir)
    if not os.path.isfile(os.path.join(models_dir, MARKER_NAME)):
        raise ValueError(f"--toy: {models_dir!r} is not a toy model bundle (no {MARKER_NAME}); build one with "
                         f"`mpp toy models {models_dir}`")
    return SamplerRenderer(toy_encoder_settings(models_dir), models_dir, settings, flag="toy")
