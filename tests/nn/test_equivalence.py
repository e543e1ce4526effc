"""Invariant: with every zero-initialized projection at zero, MppFlux's forward equals plain FLUX.

Tolerance: float32, atol = rtol = 1e-5 (observed difference: 0, the computation is op-for-op the same).
"""

from __future__ import annotations

import pytest
import torch

from mpp.nn import HeadsConfig, MppFlux, build_backbone
from tests.helpers import DIMS, make_inputs, plain_forward, randomize

ATOL = RTOL = 1e-5


@pytest.mark.parametrize("scope", ["layout", "all"])
@pytest.mark.parametrize("n", [0, 1, 4])
def test_zero_init_equals_plain_flux(make_model, scope, n):
    model, plain = make_model(lora_scope=scope)
    inputs = make_inputs(seed=n, n=n)
    with torch.no_grad():
        out = model(**inputs)
        ref = plain_forward(plain, inputs)
    assert out.velocity.shape == inputs["latents"].shape
    torch.testing.assert_close(out.velocity, ref, atol=ATOL, rtol=RTOL)
    assert out.alpha.shape == (2, n)
    if n:
        valid = inputs["instance_mask"]
        assert ((out.alpha[valid] > 0) & (out.alpha[valid] < 1)).all()
        assert (out.alpha[~valid] == 0).all()
        assert out.feedback_magnitude is not None and out.feedback_magnitude.item() == 0.0
    else:
        assert out.feedback_magnitude is None


def test_scope_all_lora_is_the_backbones_lora(make_model):
    """Heads at zero, LoRA B random: scope "all" == the backbone's own forward with the adapter on."""
    model, _ = make_model(lora_scope="all")
    randomize(model, groups=("lora",))
    inputs = make_inputs(seed=3, n=3)
    with torch.no_grad():
        out = model(**inputs).velocity
        with_lora = plain_forward(model.backbone, inputs)
        model.backbone.disable_adapters()
        without = plain_forward(model.backbone, inputs)
        model.backbone.enable_adapters()
    torch.testing.assert_close(out, with_lora, atol=ATOL, rtol=RTOL)
    assert (out - without).abs().max() > 1e-3  # the LoRA really acts


def test_scope_layout_leaves_base_path_pretrained(make_model):
    """Heads at zero, LoRA B random: scope "layout" still equals pretrained FLUX exactly."""
    model, plain = make_model(lora_scope="layout")
    randomize(model, groups=("lora",))
    inputs = make_inputs(seed=4, n=3)
    with torch.no_grad():
        out = model(**inputs).velocity
        ref = plain_forward(plain, inputs)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_build_backbone_from_saved_folder(tmp_path, tiny_config):
    torch.manual_seed(0)
    source = build_backbone(config=tiny_config)
    source.save_pretrained(tmp_path / "transformer")
    loaded = build_backbone(str(tmp_path))  # default subfolder="transformer"
    direct = build_backbone(tmp_path / "transformer", subfolder=None)
    for bb in (loaded, direct):
        for (n1, p1), (n2, p2) in zip(source.state_dict().items(), bb.state_dict().items(), strict=True):
            assert n1 == n2 and torch.equal(p1, p2)
    model = MppFlux(loaded, **DIMS, heads=HeadsConfig(lora_rank=4)).eval()
    inputs = make_inputs(seed=5, n=2)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).velocity, plain_forward(source, inputs), atol=ATOL, rtol=RTOL)


def test_build_backbone_needs_exactly_one_source(tiny_config):
    with pytest.raises(ValueError, match="pretrained_model_name_or_path"):
        build_backbone()
    with pytest.raises(ValueError, match="config"):
        build_backbone("some/model", config=tiny_config)


def test_gradient_checkpointing_same_result(make_model):
    torch.manual_seed(0)
    a, _ = make_model(seed=7)
    b, _ = make_model(seed=7, gradient_checkpointing=True)
    randomize(a)
    randomize(b)
    inputs = make_inputs(seed=6, n=3)
    grads = []
    for m in (a, b):
        out = m(**inputs)
        (out.velocity.square().mean() + out.alpha.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)


def test_instance_alpha_equals_the_forwards_alpha_without_a_backbone_pass(make_model):
    model, _ = make_model()
    model.eval()
    inputs = make_inputs(seed=3, n=4)
    with torch.no_grad():
        out = model(**inputs)
        alpha = model.instance_alpha(inputs["boxes"], inputs["instance_mask"], inputs["clip_embeds"],
                                     inputs["dino_embeds"], inputs["instance_text"])
    torch.testing.assert_close(alpha, out.alpha)
    valid = inputs["instance_mask"]
    torch.testing.assert_close(torch.sigmoid(out.alpha_logit)[valid], out.alpha[valid])


def test_has_reference_marks_missing_and_dropped_references(make_model):
    model, _ = make_model()
    inputs = make_inputs(seed=4, n=3)
    inputs["clip_embeds"][1, 2] = 0
    inputs["dino_embeds"][1, 2] = 0  # generation without a reference image
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    expected = inputs["instance_mask"].clone()
    expected[1, 2] = False
    assert torch.equal(out.has_reference, expected)
    model.train()
    model.null_embeddings.modality_dropout = 1.0
    torch.manual_seed(0)
    with torch.no_grad():
        assert not model(**inputs).has_reference.any()
