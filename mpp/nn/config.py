"""What MppFlux is built from and what it is called with: the heads' configuration, the
conditioning its forward takes beside the latents, and the guidance a guidance-distilled backbone
gets when the caller names none."""

from __future__ import annotations

from dataclasses import dataclass

# the batch keys that condition the model (besides the latents and timesteps)
CONDITIONING = ("prompt_embeds", "pooled_prompt_embeds", "boxes", "instance_mask", "instance_text",
                "clip_embeds", "dino_embeds")

# guidance fed to a guidance-distilled backbone (FLUX.1-dev) when the caller passes none; the same
# default as FluxPipeline's guidance_scale and diffusers' FLUX LoRA training scripts.
DEFAULT_GUIDANCE = 3.5


@dataclass
class HeadsConfig:
    """Widths and placement of the heads and the LoRA (DESIGN.md section 3).

    Args:
        layout_double_blocks: double blocks with a layout branch (None: every third, from 0).
        layout_single_blocks: single blocks with a layout branch (None: block 0, if there is one).
        lora_rank: LoRA rank (0: no LoRA).
        lora_alpha: LoRA alpha; the adapter's scale is alpha / rank (None: the rank, scale 1).
        lora_scope: "layout" (inside the layout branch only) or "all" (every block's projections).
        identity_dim: width of the identity code of the modulation head.
        modulation_rank: rank of the per-block AdaLN offsets.
        modulation_grid: the offsets vary over a G×G map laid over each box (1: one offset per box).
        fourier_freqs: Fourier frequencies of the box embedding.
        modality_dropout: in training, the probability of dropping an instance's reference (and,
            independently, its caption) for the learned null embeddings.
        referenced_caption_dropout: in training, the probability of dropping the caption of an instance
            whose reference reached the heads, so that the reference alone carries its appearance (None:
            ``modality_dropout``).
        use_layout_head: the Assemble-Attn layout branch (False: identity modulation only).
        instance_rope: the instance token takes the RoPE of its box centre (`mpp.nn.assemble_attn`).
        gradient_checkpointing: recompute each block in the backward pass.
    """

    layout_double_blocks: list[int] | None = None
    layout_single_blocks: list[int] | None = None
    lora_rank: int = 128
    lora_alpha: float | None = None
    lora_scope: str = "layout"
    identity_dim: int = 256
    modulation_rank: int = 8
    modulation_grid: int = 1
    fourier_freqs: int = 8
    modality_dropout: float = 0.1
    referenced_caption_dropout: float | None = None
    use_layout_head: bool = True
    instance_rope: bool = False
    gradient_checkpointing: bool = False
