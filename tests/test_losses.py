"""The pure losses and metrics of mpp.losses: α supervision, identity weights and crops."""

import pytest
import torch

from mpp.encoders import Encoders, crop_boxes
from mpp.lit_module import Loss
from mpp.losses import (
    alpha_loss,
    alpha_metrics,
    alpha_targets,
    auc,
    box_embeddings,
    gaussian_blur,
    identity_crops,
    identity_loss,
    identity_weights,
    latent_windows,
    view_jitter,
)
from mpp.nn.alpha import AlphaPredictor


@pytest.fixture(scope="module")
def toy_encoders(toy_settings):
    return Encoders(toy_settings)


def _latents(encoders, g, b=2):
    images = torch.rand(b, 3, 64, 64, generator=g) * 2 - 1
    return encoders.encode_images(images)


def test_alpha_loss_takes_the_logit_and_runs_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    predictor = AlphaPredictor(8, 8, hidden_dim=16)
    clip, dino, boxes = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), torch.rand(6, 4, generator=g)
    roles = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logit = predictor(clip, dino, boxes).view(2, 3)
        assert logit.dtype == torch.bfloat16
        loss = alpha_loss(logit, roles, mask)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert predictor.mlp[0].weight.grad.abs().sum() > 0
    # only labelled, valid instances count: the unknown role and the padded one change nothing
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logit.detach().float()[[0, 0, 1, 1], [0, 1, 0, 1]], torch.tensor([1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(loss.detach(), expected)
    assert alpha_loss(logit, torch.full((2, 3), -1.0), mask) is None


def test_auc_and_alpha_metrics():
    labels = torch.tensor([1, 1, 0, 0])
    assert auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), labels) == 1.0
    assert auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels) == 0.0
    assert auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), labels) == 0.5
    assert auc(torch.tensor([0.9, 0.1, 0.8, 0.2]), labels) == 0.5
    assert auc(torch.tensor([0.9, 0.2, 0.8, 0.1]), labels) == 0.75
    assert auc(torch.tensor([0.3, 0.4]), torch.tensor([1, 1])) is None
    alpha = torch.tensor([[0.9, 0.3, 0.7], [0.2, 0.6, 0.0]])
    roles = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    m = alpha_metrics(alpha, roles, mask)
    torch.testing.assert_close(m["alpha_mean"], torch.tensor((0.9 + 0.3 + 0.7 + 0.2 + 0.6) / 5))
    torch.testing.assert_close(m["alpha_fg_ratio"], torch.tensor(3 / 5))
    assert m["alpha_auc"] == 1.0  # labelled: fg {0.9, 0.6} above bg {0.3, 0.2}


def test_identity_weights_are_the_roles_and_background_gets_none():
    alpha = torch.tensor([[0.1, 0.9, 0.8, 0.2]], requires_grad=True)
    roles = torch.tensor([[1.0, 0.0, -1.0, -1.0]])
    mask = torch.tensor([[True, True, True, False]])
    w = identity_weights(alpha, roles, mask)
    # a labelled foreground with low α still counts fully; background never; unknown by α; padding never
    assert w.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert not w.requires_grad


def test_identity_loss_gradient_does_not_reach_alpha(toy_encoders):
    g = torch.Generator().manual_seed(1)
    x0 = _latents(toy_encoders, g).requires_grad_()
    alpha = torch.tensor([[0.2, 0.9], [0.7, 0.4]], requires_grad=True)
    roles = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.5], [0.5, 0.5, 0.9, 0.9]], [[0.0, 0.2, 0.4, 0.8], [0.3, 0.3, 1.0, 0.7]]])
    ref = torch.randn(2, 2, toy_encoders.dino.config.hidden_size, generator=g)
    loss, sim = identity_loss(x0, boxes=boxes, weights=identity_weights(alpha, roles, mask), reference_dino=ref,
                              encoders=toy_encoders, margin=0.1)
    grad_x0, grad_alpha = torch.autograd.grad(loss, [x0, alpha], allow_unused=True)
    assert grad_alpha is None  # lowering α cannot lower the loss
    assert grad_x0.abs().sum() > 0
    assert -1 <= sim <= 1


def test_background_instances_get_no_identity_loss(toy_encoders):
    g = torch.Generator().manual_seed(2)
    x0 = _latents(toy_encoders, g, b=1)
    boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.5], [0.5, 0.5, 0.9, 0.9]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    alpha = torch.full((1, 2), 0.9)
    ref = torch.randn(1, 2, toy_encoders.dino.config.hidden_size, generator=g)
    weights = identity_weights(alpha, torch.tensor([[1.0, 0.0]]), mask)
    loss, _ = identity_loss(x0, boxes=boxes, weights=weights, reference_dino=ref, encoders=toy_encoders)
    other = ref.clone()
    other[0, 1] = torch.randn(ref.shape[-1], generator=g)  # the background's reference changes nothing
    again, _ = identity_loss(x0, boxes=boxes, weights=weights, reference_dino=other, encoders=toy_encoders)
    torch.testing.assert_close(loss, again)
    only_background = identity_weights(alpha, torch.tensor([[0.0, 0.0]]), mask)
    assert identity_loss(x0, boxes=boxes, weights=only_background, reference_dino=ref, encoders=toy_encoders) is None


def test_crops_are_decoded_at_native_latent_resolution_then_resized(toy_encoders, monkeypatch):
    g = torch.Generator().manual_seed(3)
    x0 = _latents(toy_encoders, g)  # 2×16×8×8 latents of 64×64 images
    box = [0.2, 0.3, 0.7, 0.65]
    rows = torch.tensor([[1.0, *box]])
    decoded_shapes, embedded_shapes = [], []
    decode, embed = toy_encoders.decode_latents, toy_encoders.dino_embeds
    monkeypatch.setattr(toy_encoders, "decode_latents", lambda z: decoded_shapes.append(tuple(z.shape)) or decode(z))
    monkeypatch.setattr(toy_encoders, "dino_embeds", lambda x: embedded_shapes.append(tuple(x.shape)) or embed(x))
    emb = identity_crops(x0, rows, encoders=toy_encoders, margin=0.1, gradient_checkpointing=False)

    (window, pixel), = latent_windows(rows[:, 1:], latent_hw=(8, 8), downsample=8, margin=0.1)
    lx0, ly0, lx1, ly1 = window
    # the latent is cut, not resampled: the box with margin, rounded out, and a latent pixel of context
    assert decoded_shapes == [(1, 16, ly1 - ly0, lx1 - lx0)] and (ly1 - ly0, lx1 - lx0) == (6, 7)
    assert embedded_shapes == [(1, 3, toy_encoders.dino_size, toy_encoders.dino_size)]
    # the same pixels as preparation's crop of the decoded image (the toy codec decodes patch by patch)
    full = decode(x0[1:2])
    reference = crop_boxes(full, torch.tensor([[box]]), size=toy_encoders.dino_size, margin=0.1)[0]
    torch.testing.assert_close(emb, embed(reference.clamp(-1, 1)), atol=1e-5, rtol=1e-4)
    px0, py0, px1, py1 = pixel
    assert (px1 - px0, py1 - py0) == (39, 28)  # x 0.15–0.75, y 0.265–0.685 of 64 px, rounded outward


def test_an_instance_without_its_reference_is_trained_toward_background():
    roles = torch.tensor([[1.0, 0.0, -1.0, 1.0]])
    seen = torch.tensor([[True, True, True, False]])  # the last one's reference was dropped or missing
    assert alpha_targets(roles, seen).tolist() == [[1.0, 0.0, -1.0, 0.0]]
    weights = identity_weights(torch.full((1, 4), 0.9), roles, torch.ones(1, 4, dtype=torch.bool), seen)
    assert weights.tolist() == [[1.0, 0.0, 1.0, 0.0]]  # no identity loss toward a reference it did not see


def test_identity_views_start_with_the_crop_itself_and_stay_differentiable(toy_encoders):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, 16, 16, generator=g, requires_grad=True)
    rows = torch.tensor([[0.0, 0.1, 0.2, 0.6, 0.7]])
    plain = identity_crops(x0, rows, encoders=toy_encoders, margin=0.1, gradient_checkpointing=False)
    jitter = view_jitter(1, 3, torch.Generator().manual_seed(1))
    views = identity_crops(x0, rows, encoders=toy_encoders, margin=0.1, gradient_checkpointing=True, jitter=jitter)
    assert views.shape == (1, 3, plain.shape[-1])
    assert torch.allclose(views[:, 0], plain, atol=1e-5)  # the first view is the crop as it is
    assert not torch.allclose(views[:, 1], plain, atol=1e-3)
    direction = torch.randn(plain.shape[-1], generator=g)
    (views @ direction).sum().backward()
    assert x0.grad.abs().sum() > 0


def test_identity_loss_with_views_is_the_mean_over_views(toy_encoders):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, 16, 16, generator=g)
    boxes = torch.tensor([[[0.1, 0.2, 0.6, 0.7]]])
    weights = torch.ones(1, 1)
    ref = torch.randn(1, 1, 64, generator=g)
    loss, sim = identity_loss(x0, boxes=boxes, weights=weights, reference_dino=ref, encoders=toy_encoders,
                              views=4, generator=torch.Generator().manual_seed(2))
    emb = identity_crops(x0, torch.tensor([[0.0, 0.1, 0.2, 0.6, 0.7]]), encoders=toy_encoders, margin=0.1,
                         jitter=view_jitter(1, 4, torch.Generator().manual_seed(2)))
    cos = torch.nn.functional.cosine_similarity(emb, ref[0, 0], dim=-1).mean()
    assert torch.allclose(loss, 1 - cos, atol=1e-5) and torch.allclose(sim, cos, atol=1e-5)


def test_gaussian_blur_keeps_the_mean_and_spreads_a_point():
    x = torch.zeros(1, 3, 9, 9)
    x[..., 4, 4] = 1.0
    y = gaussian_blur(x, 1.0)
    assert torch.allclose(y.sum((-1, -2)), torch.ones(1, 3), atol=1e-5)
    assert 0.1 < y[0, 0, 4, 4] < 0.2 and y[0, 0, 4, 5] > 0
    assert torch.equal(gaussian_blur(x, 0.0), x)


def test_box_embeddings_are_the_identity_crops_of_the_selected_boxes(toy_encoders):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 16, 16, generator=g)
    boxes = torch.tensor([[[0.1, 0.2, 0.6, 0.7], [0.5, 0.5, 0.9, 0.9]]]).expand(2, 2, 4)
    select = torch.tensor([[True, False], [False, True]])
    out = box_embeddings(x0, boxes, select, encoders=toy_encoders, margin=0.1)
    rows = torch.tensor([[0.0, 0.1, 0.2, 0.6, 0.7], [1.0, 0.5, 0.5, 0.9, 0.9]])
    expected = identity_crops(x0, rows, encoders=toy_encoders, margin=0.1, gradient_checkpointing=False)
    assert torch.allclose(out[select], expected, atol=1e-6)
    assert not out[~select].any()


@pytest.mark.parametrize("field, value", [("dino_target", "pixels"), ("dino_views", 0)])
def test_identity_settings_are_checked(field, value):
    with pytest.raises(ValueError, match=f"model.loss.{field}"):
        Loss(**{field: value})


def test_identity_crop_windows_follow_a_widescreen_latent():
    # a 192×80 image (latent 10×24): x scales with the width, y with the height
    (window, pixel), = latent_windows(torch.tensor([[0.5, 0.5, 0.75, 1.0]]), latent_hw=(10, 24), downsample=8,
                                      margin=0.0, context=0)
    assert window == (12, 5, 18, 10)  # x 96–144 px, y 40–80 px in latent pixels
    assert pixel == (0, 0, 48, 40)
