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


def view_jitter(count: int, views: int, generator: torch.Generator | None = None, *, scale: float = 0.2,
                shift: float = 0.1) -> Tensor:
    """count×views×2×3 affine maps for `F.affine_grid`: the first view of each crop is the identity,
    the others zoom in or out by up to `scale` (per axis) and shift by up to `shift` of the crop."""
    u = torch.rand(count, views, 4, generator=generator) * 2 - 1
    theta = torch.zeros(count, views, 2, 3)
    theta[..., 0, 0] = 1 + scale * u[..., 0]
    theta[..., 1, 1] = 1 + scale * u[..., 1]
    theta[..., 0, 2] = shift * u[..., 2]
    theta[..., 1, 2] = shift * u[..., 3]
    theta[:, 0] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    return theta


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """…×C×H×W images blurred by a Gaussian of `sigma` pixels (separable, reflect-padded); 0: unchanged."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = images.shape[-3]
    flat = images.reshape(-1, c, *images.shape[-2:])
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    flat = F.conv2d(flat, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return flat.reshape(images.shape)


def identity_crops(x0: Tensor, boxes: Tensor, *, encoders: Encoders, margin: float,
                   gradient_checkpointing: bool = True, jitter: Tensor | None = None, blur: float = 0.0) -> Tensor:
    """K×D DINOv2 embeddings of the K boxes (`boxes`: K×5 rows of sample index and normalized xyxy)
    of the predicted clean latents `x0` (B×C×h×w): each box is cut from the latent at native
    resolution (with margin and a latent pixel of context), decoded by the frozen VAE, cut to the
    exact pixel box, and only then resized to DINOv2's input, as preparation made the references
    (the decoder does not commute with resampling latents). With `jitter` (K×V×2×3, from
    :func:`view_jitter`), each crop is embedded in V resampled views: K×V×D. `blur` (pixels at
    DINOv2's input size) low-passes every crop first."""
    windows = latent_windows(boxes[:, 1:], latent_hw=tuple(x0.shape[-2:]), downsample=encoders.vae_downsample,
                             margin=margin)
    size = encoders.dino_size

    def embed(latent: Tensor, pixel: tuple[int, int, int, int], theta: Tensor | None) -> Tensor:
        image = encoders.decode_latents(latent).clamp(-1, 1)
        px0, py0, px1, py1 = pixel
        crop = image[:, :, py0:py1, px0:px1]
        crop = gaussian_blur(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=True), blur)
        if theta is None:
            return encoders.dino_embeds(crop)
        grid = F.affine_grid(theta.to(crop), [len(theta), crop.shape[1], size, size], align_corners=False)
        views = F.grid_sample(crop.expand(len(theta), -1, -1, -1), grid, mode="bilinear", padding_mode="border",
                              align_corners=False)
        return encoders.dino_embeds(views)[None]

    out = []
    for k, ((i, _, _, _, _), ((lx0, ly0, lx1, ly1), pixel)) in enumerate(zip(boxes.tolist(), windows, strict=True)):
        latent = x0[int(i) : int(i) + 1, :, ly0:ly1, lx0:lx1]
        theta = None if jitter is None else jitter[k]
        if gradient_checkpointing and torch.is_grad_enabled():
            out.append(checkpoint(embed, latent, pixel, theta, use_reentrant=False))
        else:
            out.append(embed(latent, pixel, theta))
    return torch.cat(out)


def _selected_rows(boxes: Tensor, select: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The (sample, instance) indices of the `select`ed (B×N bool) boxes and their K×5 rows of sample
    index and normalized xyxy, as :func:`identity_crops` takes them."""
    b_idx, k_idx = select.nonzero(as_tuple=True)
    return b_idx, k_idx, torch.cat([b_idx[:, None].to(boxes.dtype), boxes[b_idx, k_idx]], dim=-1)


def box_embeddings(x0: Tensor, boxes: Tensor, select: Tensor, *, encoders: Encoders, margin: float,
                   blur: float = 0.0) -> Tensor:
    """B×N×D DINOv2 embeddings of the `select`ed (B×N bool) boxes of clean latents `x0`, cropped as
    :func:`identity_crops` does (zeros elsewhere): the identity loss's target taken from the frame."""
    b_idx, k_idx, rows = _selected_rows(boxes, select)
    out = x0.new_zeros(*select.shape, encoders.dino.config.hidden_size)
    if len(b_idx):
        emb = identity_crops(x0, rows, encoders=encoders, margin=margin, gradient_checkpointing=False, blur=blur)
        out[b_idx, k_idx] = emb.to(out.dtype)
    return out


def identity_loss(x0: Tensor, *, boxes: Tensor, weights: Tensor, reference_dino: Tensor, encoders: Encoders,
                  margin: float = 0.1, gradient_checkpointing: bool = True, views: int = 1,
                  generator: torch.Generator | None = None, blur: float = 0.0) -> tuple[Tensor, Tensor] | None:
    """DINO identity loss of DESIGN.md section 4 on predicted clean latents `x0` (B×C×h×w, e.g.
    x̂0 = x_t − t·v̂ at a low t): the weighted mean over instances of 1 − cosine(DINOv2 of the
    decoded box, reference embedding). `weights` (B×N, from :func:`identity_weights`) are data, not
    a gradient path: the model cannot lower the loss by lowering α. With `views` > 1 each box counts
    as the mean over that many randomly zoomed and shifted views of it (:func:`view_jitter`, drawn from
    `generator`), so that the generator cannot lower the loss with a pattern that only fools the
    encoder at one exact framing. `blur` low-passes the crops (:func:`gaussian_blur`) so that the loss
    cannot be lowered by pixel-level patterns the encoder over-reads. Returns (loss, mean similarity
    of the weighted instances), or None when no instance has weight.
    """
    weights = weights.detach()
    sel = weights > 0
    if not sel.any():
        return None
    b_idx, k_idx, rows = _selected_rows(boxes, sel)
    jitter = view_jitter(len(rows), views, generator) if views > 1 else None
    emb = identity_crops(x0, rows, encoders=encoders, margin=margin, gradient_checkpointing=gradient_checkpointing,
                         jitter=jitter, blur=blur)
    ref = reference_dino[b_idx, k_idx].float().to(emb.device)
    if jitter is not None:
        ref = ref[:, None]
    cos = F.cosine_similarity(emb.float(), ref, dim=-1)
    if jitter is not None:
        cos = cos.mean(1)
    w = weights[b_idx, k_idx].float()
    loss = (w * (1 - cos)).sum() / w.sum()
    return loss, (w * cos).sum().detach() / w.sum()
