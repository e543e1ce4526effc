"""mpp's model: the FLUX.1 backbone with Assemble-Attn layout head, identity modulation, feedback
bridge and LoRA (plain PyTorch + diffusers + peft; no Lightning here)."""

from .backbone import build_backbone
from .model import DEFAULT_GUIDANCE, GROUPS, STAGE_GROUPS, MppFlux, MppOutput, set_trainable
from .packing import box_token_mask, image_ids, pack_latents, text_ids, unpack_latents


def __getattr__(name: str):
    # lazy, so that `python -m mpp.nn.params` does not import the module twice
    if name in ("count_parameters", "parameter_report"):
        from . import params

        return getattr(params, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_GUIDANCE",
    "GROUPS",
    "STAGE_GROUPS",
    "MppFlux",
    "MppOutput",
    "box_token_mask",
    "build_backbone",
    "count_parameters",
    "image_ids",
    "pack_latents",
    "parameter_report",
    "set_trainable",
    "text_ids",
    "unpack_latents",
]
