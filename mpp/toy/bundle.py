"""Where the toy bundle (`mpp.toy.models.build_toy_models`) keeps each encoder, as the
`EncoderSettings` that load them."""

from __future__ import annotations

import os

from mpp.encoders import EncoderSettings


def toy_encoder_settings(models_dir: str | os.PathLike) -> EncoderSettings:
    """Encoder settings of the toy bundle in `models_dir`."""
    models_dir = os.fspath(models_dir)
    return EncoderSettings(flux=models_dir, clip_vision=os.path.join(models_dir, "image_encoder"),
                           dino=os.path.join(models_dir, "dino"), t5_max_length=32, clip_max_length=32,
                           crop_margin=0.1)
