"""Training losses: pure functions of (x0, noise, t, conditioning) and the model's outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mpp.encoders import Encoders, crop_boxes
from mpp.flow import predicted_x0


def identity_loss(x_t: Tensor, t: Tensor, velocity: Tensor, *, boxes: Tensor, instance_mask: Tensor,
                  alpha: Tensor, reference_dino: Tensor, encoders: Encoders, t_threshold: float,
                  margin: float = 0.1, gradient_checkpointing: bool = True) -> tuple[Tensor, Tensor] | None:
    """DINO identity loss of DESIGN.md section 4.

    For samples with t < t_threshold: x̂0 = x_t − t·v̂, each instance's latent crop (with margin) is
    decoded by the frozen VAE and embedded by the frozen DINOv2; the loss is 1 − cosine to the
    reference embedding, weighted by α. Returns (loss, mean similarity), or None when no sample
    of the batch is below the threshold or no instance is valid.
    """
    sel = t < t_threshold
    valid = instance_mask[sel]
    if not valid.any():
        return None
    x0 = predicted_x0(x_t[sel], t[sel], velocity[sel])
    size = max(encoders.dino_size // encoders.vae_downsample, 2)
    crops = crop_boxes(x0, boxes[sel], size=size, margin=margin)[valid]

    def embed(latent_crops: Tensor) -> Tensor:
        return encoders.dino_embeds(encoders.decode_latents(latent_crops).clamp(-1, 1))

    emb = checkpoint(embed, crops, use_reentrant=False) if gradient_checkpointing else embed(crops)
    cos = F.cosine_similarity(emb.float(), reference_dino[sel][valid].float(), dim=-1)
    weight = alpha[sel][valid].float()
    loss = (weight * (1 - cos)).sum() / weight.sum().clamp_min(1e-6)
    return loss, cos.mean().detach()


def alpha_bce(alpha: Tensor, foreground: Tensor, instance_mask: Tensor) -> Tensor | None:
    """BCE of α against `foreground` labels where the data has them (label ≥ 0)."""
    labelled = instance_mask & (foreground >= 0)
    if not labelled.any():
        return None
    return F.binary_cross_entropy(alpha[labelled].float().clamp(1e-6, 1 - 1e-6), foreground[labelled].float())
