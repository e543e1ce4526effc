"""Training losses and metrics: pure functions of tensors (and the frozen encoders they run through)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mpp.encoders import Encoders


def alpha_targets(roles: Tensor, has_reference: Tensor) -> Tensor:
    """What α is trained toward: the instance's role (1 foreground, 0 background, −1 unknown) where
    its reference reached the model, 0 where it did not (missing or dropped): with no reference there
    is no identity to keep, which is how generation sees an instance given without one."""
    return torch.where(has_reference, roles, torch.zeros_like(roles))


def alpha_loss(alpha_logit: Tensor, foreground: Tensor, instance_mask: Tensor) -> Tensor | None:
    """BCE with logits of α against the labelled instances' roles (autocast-safe); None when none is
    labelled. `foreground`: 1 foreground (identity-bearing), 0 background, −1 unknown (see
    `mpp.data.dataset.instance_roles` for the rule where a dataset has no flag)."""
    labelled = instance_mask & (foreground >= 0)
    if not labelled.any():
        return None
    return F.binary_cross_entropy_with_logits(alpha_logit[labelled].float(), foreground[labelled].float())


def identity_weights(alpha: Tensor, foreground: Tensor, instance_mask: Tensor,
                     has_reference: Tensor | None = None) -> Tensor:
    """Per-instance weights of the identity loss, never a path for its gradient: 1 on labelled
    foreground instances, 0 on background and padding (and, given `has_reference`, on instances whose
    reference the model did not see); an unlabelled instance counts as foreground where its
    (detached) α says so."""
    predicted = (alpha.detach() > 0.5).float()
    role = torch.where(foreground >= 0, foreground.float(), predicted)
    mask = instance_mask if has_reference is None else instance_mask & has_reference
    return role * mask.float()


def auc(scores: Tensor, labels: Tensor) -> Tensor | None:
    """Area under the ROC curve of `scores` for binary `labels` (the Mann–Whitney statistic, ties
    counted half); None unless both classes are present."""
    scores, labels = scores.detach().float().flatten(), labels.flatten().bool()
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return greater + 0.5 * ties


def alpha_metrics(alpha: Tensor, foreground: Tensor, instance_mask: Tensor) -> dict[str, Tensor]:
    """`alpha_mean`, `alpha_fg_ratio` (share of instances with α > 0.5) and, where the batch holds
    both labelled roles, `alpha_auc` (foreground vs background)."""
    valid = instance_mask.bool()
    if not valid.any():
        return {}
    a = alpha[valid].detach().float()
    out = {"alpha_mean": a.mean(), "alpha_fg_ratio": (a > 0.5).float().mean()}
    labelled = valid & (foreground >= 0)
    area = auc(alpha[labelled], foreground[labelled] > 0.5)
    if area is not None:
        out["alpha_auc"] = area
    return out


def latent_windows(boxes: Tensor, *, latent_hw: tuple[int, int], downsample: int, margin: float,
                   context: int = 1) -> list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]:
    """For each N×4 normalized box: the latent window to decode (the box with `margin` of its size on
    each side, rounded outward to whole latent pixels, plus `context` latent pixels the decoder needs
    at the edges) and, inside the decoded window, the pixel box to crop: the same box with margin that
    preparation cropped from the full image. Both xyxy, end-exclusive."""
    h, w = latent_hw
    H, W = h * downsample, w * downsample
    out = []
    for x0, y0, x1, y1 in boxes.tolist():
        mx, my = (x1 - x0) * margin, (y1 - y0) * margin
        px0, py0 = math.floor(max(0.0, x0 - mx) * W), math.floor(max(0.0, y0 - my) * H)
        px1 = min(W, max(math.ceil(min(1.0, x1 + mx) * W), px0 + 1))
        py1 = min(H, max(math.ceil(min(1.0, y1 + my) * H), py0 + 1))
        lx0, ly0 = max(0, px0 // downsample - context), max(0, py0 // downsample - context)
        lx1, ly1 = min(w, -(-px1 // downsample) + context), min(h, -(-py1 // downsample) + context)
        pixel = (px0 - lx0 * downsample, py0 - ly0 * downsample, px1 - lx0 * downsample, py1 - ly0 * downsample)
        out.append(((lx0, ly0, lx1, ly1), pixel))
    return out


def identity_crops(x0: Tensor, boxes: Tensor, *, encoders: Encoders, margin: float,
                   gradient_checkpointing: bool = True) -> Tensor:
    """K×D DINOv2 embeddings of the K boxes (`boxes`: K×5 rows of sample index and normalized xyxy)
    of the predicted clean latents `x0` (B×C×h×w): each box is cut from the latent at native
    resolution (with margin and a latent pixel of context), decoded by the frozen VAE, cut to the
    exact pixel box, and only then resized to DINOv2's input, as preparation made the references
    (the decoder does not commute with resampling latents)."""
    windows = latent_windows(boxes[:, 1:], latent_hw=tuple(x0.shape[-2:]), downsample=encoders.vae_downsample,
                             margin=margin)

    def embed(latent: Tensor, pixel: tuple[int, int, int, int]) -> Tensor:
        image = encoders.decode_latents(latent).clamp(-1, 1)
        px0, py0, px1, py1 = pixel
        crop = image[:, :, py0:py1, px0:px1]
        crop = F.interpolate(crop, size=(encoders.dino_size, encoders.dino_size), mode="bilinear",
                             align_corners=False, antialias=True)
        return encoders.dino_embeds(crop)

    out = []
    for (i, _, _, _, _), ((lx0, ly0, lx1, ly1), pixel) in zip(boxes.tolist(), windows, strict=True):
        latent = x0[int(i) : int(i) + 1, :, ly0:ly1, lx0:lx1]
        if gradient_checkpointing and torch.is_grad_enabled():
            out.append(checkpoint(embed, latent, pixel, use_reentrant=False))
        else:
            out.append(embed(latent, pixel))
    return torch.cat(out)


def identity_loss(x0: Tensor, *, boxes: Tensor, weights: Tensor, reference_dino: Tensor, encoders: Encoders,
                  margin: float = 0.1, gradient_checkpointing: bool = True) -> tuple[Tensor, Tensor] | None:
    """DINO identity loss of DESIGN.md section 4 on predicted clean latents `x0` (B×C×h×w, e.g.
    x̂0 = x_t − t·v̂ at a low t): the weighted mean over instances of 1 − cosine(DINOv2 of the
    decoded box, reference embedding). `weights` (B×N, from :func:`identity_weights`) are data, not
    a gradient path: the model cannot lower the loss by lowering α. Returns (loss, mean similarity
    of the weighted instances), or None when no instance has weight.
    """
    weights = weights.detach()
    sel = weights > 0
    if not sel.any():
        return None
    b_idx, k_idx = sel.nonzero(as_tuple=True)
    rows = torch.cat([b_idx[:, None].to(boxes.dtype), boxes[b_idx, k_idx]], dim=-1)
    emb = identity_crops(x0, rows, encoders=encoders, margin=margin, gradient_checkpointing=gradient_checkpointing)
    cos = F.cosine_similarity(emb.float(), reference_dino[b_idx, k_idx].float().to(emb.device), dim=-1)
    w = weights[b_idx, k_idx].float()
    loss = (w * (1 - cos)).sum() / w.sum()
    return loss, (w * cos).sum().detach() / w.sum()
