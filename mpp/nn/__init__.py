"""mpp's model: the FLUX.1 backbone with Assemble-Attn layout head, identity modulation, feedback
bridge and LoRA (plain PyTorch + diffusers + peft; no Lightning here). The parameter report is
`mpp.nn.params`."""

from .backbone import backbone_config, build_backbone, explain_missing, flux_velocity
from .config import CONDITIONING, DEFAULT_GUIDANCE, HeadsConfig
from .model import GROUPS, STAGE_GROUPS, MppFlux, MppOutput, set_trainable
from .packing import box_token_mask, image_ids, pack_latents, text_ids, unpack_latents

__all__ = [
    "CONDITIONING",
    "DEFAULT_GUIDANCE",
    "GROUPS",
    "STAGE_GROUPS",
    "HeadsConfig",
    "MppFlux",
    "MppOutput",
    "box_token_mask",
    "backbone_config",
    "build_backbone",
    "explain_missing",
    "flux_velocity",
    "image_ids",
    "pack_latents",
    "set_trainable",
    "text_ids",
    "unpack_latents",
]
