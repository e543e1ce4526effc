"""The embedded toy world (DESIGN.md section 7): procedural scenes, a PCA patch codec standing in
for the VAE, and a bundle of tiny encoders/backbone of the real classes.

``scenes`` needs only numpy/pillow and ``codec`` only torch; ``models`` (transformers, diffusers)
is imported lazily on first use of its names.
"""

from .codec import PatchCodec
from .scenes import Identity, Scene, ToyInstance, ToyWorld, box_iou, color_mask, mask_box

_LAZY = {"build_toy_models", "toy_flux_config", "build_toy_tokenizer"}

__all__ = [
    "Identity",
    "PatchCodec",
    "Scene",
    "ToyInstance",
    "ToyWorld",
    "box_iou",
    "color_mask",
    "mask_box",
    *sorted(_LAZY),
]


def __getattr__(name):
    if name in _LAZY:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
