"""Validation messages, packing, LoRA helpers and the adapter state dict."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

from mpp.nn import HeadsConfig, MppFlux, build_backbone, image_ids, pack_latents, unpack_latents
from mpp.nn.lora import base_linear, lora_delta
from mpp.nn.packing import box_token_mask
from tests.helpers import DIMS, make_inputs, plain_forward


def test_lora_scope_validation_names_the_argument(tiny_config):
    with pytest.raises(ValueError, match="lora_scope"):
        MppFlux(build_backbone(config=tiny_config), **DIMS, heads=HeadsConfig(lora_scope="everywhere"))
    with pytest.raises(ValueError, match="lora_scope"):
        MppFlux(build_backbone(config=tiny_config), **DIMS,
                heads=HeadsConfig(lora_scope="layout", use_layout_head=False))


def test_layout_block_validation(tiny_config):
    with pytest.raises(ValueError, match="layout_double_blocks"):
        MppFlux(build_backbone(config=tiny_config), **DIMS, heads=HeadsConfig(layout_double_blocks=[0, 9]))


def test_packing_matches_diffusers():
    lat = torch.randn(2, 16, 6, 10)
    packed = pack_latents(lat)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(lat, 2, 16, 6, 10), rtol=0, atol=0)
    assert torch.equal(unpack_latents(packed, 6, 10), lat)
    ref_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(image_ids(3, 5), ref_ids)


def test_lora_helpers_and_state_dict(make_model):
    model, _ = make_model(lora_scope="all")
    mod = model.backbone.transformer_blocks[0].attn.to_q
    with torch.no_grad():
        mod.lora_B["mpp"].weight.normal_()
        x = torch.randn(3, model.inner_dim)
        torch.testing.assert_close(base_linear(mod, x) + lora_delta(mod, x), mod(x))
    sd = model.lora_state_dict()
    assert sd and all(".lora_A." in k or ".lora_B." in k for k in sd)
    assert "transformer_blocks.0.attn.to_q.lora_B.weight" in sd
    assert len(sd) == 2 * (4 * 8 + 2 * 3)  # scope "all": every block of the tiny config


def test_scope_layout_only_adapts_layout_blocks(make_model):
    model, _ = make_model()
    sd = model.lora_state_dict()
    blocks = {".".join(k.split(".")[:2]) for k in sd}
    assert blocks == {"transformer_blocks.0", "transformer_blocks.3", "single_transformer_blocks.0"}


def test_no_layout_head_variant_runs(make_model):
    from tests.helpers import make_inputs

    model, _ = make_model(use_layout_head=False, lora_scope="all")
    assert model.parameter_groups()["layout"] == []
    out = model(**make_inputs(n=2))
    assert out.velocity.shape == (2, 16, 12, 16)


def test_bf16_backbone_with_fp32_heads(tiny_config):
    from tests.helpers import make_inputs, randomize

    torch.manual_seed(0)
    backbone = build_backbone(config=tiny_config, torch_dtype=torch.bfloat16)
    model = MppFlux(backbone, **DIMS, heads=HeadsConfig(lora_rank=4))
    randomize(model)
    assert all(p.dtype == torch.float32 for p in model.parameter_groups()["lora"])
    out = model(**make_inputs(n=3))
    assert out.velocity.dtype == torch.bfloat16 and out.alpha.dtype == torch.float32
    out.velocity.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameter_groups()["lora"])


def test_instance_rope_changes_only_what_the_layout_branch_does(make_model):
    from tests.helpers import make_inputs, randomize

    inputs = make_inputs(n=2)
    outs = {}
    for flag in (False, True):
        model, _ = make_model(instance_rope=flag)
        with torch.no_grad():
            outs[flag, "zero"] = model(**inputs).velocity  # layout projections still zero: no effect
            randomize(model, groups=("layout",))
            outs[flag, "trained"] = model(**inputs).velocity
    assert torch.equal(outs[False, "zero"], outs[True, "zero"])
    assert not torch.allclose(outs[False, "trained"], outs[True, "trained"], atol=1e-4)


def test_a_missing_backbone_says_what_is_missing_and_how_to_provide_it(tmp_path):
    (tmp_path / "flux").mkdir()  # a local folder without the transformer in it
    with pytest.raises(ValueError, match="model.backbone") as e:
        build_backbone(str(tmp_path / "flux"))
    message = str(e.value)
    assert "does not hold it" in message and "--model.backbone=/path/to/folder" in message
    assert len(message.splitlines()) == 3
    with pytest.raises(ValueError, match="not a local folder") as e:
        build_backbone("not a/valid hub id")
    assert "huggingface-cli download" in str(e.value)


def test_a_widescreen_grid_packs_ids_and_masks_by_its_own_rows_and_columns():
    lat = torch.randn(1, 16, 10, 24)  # a 192×80 frame: 5 × 12 tokens
    torch.testing.assert_close(pack_latents(lat), FluxPipeline._pack_latents(lat, 1, 16, 10, 24), rtol=0, atol=0)
    assert torch.equal(image_ids(5, 12), FluxPipeline._prepare_latent_image_ids(1, 5, 12, "cpu", torch.float32))
    # the right half of the top 40 %: token centres x in (0.5, 1], y in [0, 0.4] → rows 0-1, columns 6-11
    member = box_token_mask(torch.tensor([[[0.5, 0.0, 1.0, 0.4]]]), 5, 12)[0, 0].view(5, 12)
    expected = torch.zeros(5, 12, dtype=torch.bool)
    expected[:2, 6:] = True
    assert torch.equal(member, expected)


def test_the_model_at_a_widescreen_size_is_plain_flux_with_zero_heads_and_uses_its_boxes(make_model):
    model, plain = make_model()
    inputs = make_inputs(h=10, w=24)
    with torch.no_grad():
        out = model(**inputs).velocity
        torch.testing.assert_close(out, plain_forward(plain, inputs), rtol=1e-5, atol=1e-5)
        assert out.shape == inputs["latents"].shape
