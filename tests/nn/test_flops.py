"""The analytic FLOP count against torch's FlopCounterMode on the real code, and on the FLUX.1-dev config."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mpp.nn import STAGE_GROUPS, HeadsConfig, set_trainable
from mpp.nn.flops import StepFlops, backbone_flops, mpp_flops
from mpp.nn.params import FLUX_DEV_CONFIG, build_flux_dev
from tests.helpers import make_inputs

# three boxes of 12 tokens each on the 6×8 token grid of make_inputs: one bucket without padding, so
# the attention the kernel runs is exactly the attention the count calls useful
BOXES = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.25, 0.0, 0.75, 0.5]]]).expand(2, -1, -1)


def _counted(model, inputs, backward: bool) -> int:
    # the math kernel decomposes attention into matmuls, which the counter sees (CPU flash it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(**inputs)
        if backward:
            (out.velocity.square().mean() + out.alpha.sum()).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("scope, grid", [("layout", 1), ("all", 1), ("layout", 4)])
def test_forward_count_equals_the_executed_matmuls(make_model, stage, scope, grid):
    model, _ = make_model(lora_scope=scope, modulation_grid=grid)
    set_trainable(model, STAGE_GROUPS[stage])
    inputs = make_inputs(seed=0, boxes=BOXES)
    assert len(model.layout_blocks) == 3
    count = mpp_flops(model, batch=2, latent_hw=(12, 16), text_tokens=6, boxes=BOXES,
                      instance_mask=inputs["instance_mask"])
    assert count.total_forward == _counted(model, inputs, backward=False)
    # stage 1 skips the zero modulation offsets, stage 2 computes them
    assert ("modulation_offsets" in count.forward) == (stage == 2)
    # training: the executed backward is close to the useful count; the small differences are the count's
    # two documented simplifications (block 0 and the heads' first layers need no input gradient)
    model.train()
    model.null_embeddings.modality_dropout = 0.0
    ratio = _counted(model, inputs, backward=True) / count.total_training
    assert 0.94 < ratio < 1.06


def test_multipliers_follow_what_trains(make_model):
    model, _ = make_model()
    set_trainable(model, STAGE_GROUPS[1])
    count = mpp_flops(model, batch=2, latent_hw=(12, 16), text_tokens=6, boxes=BOXES,
                      instance_mask=torch.ones(2, 3, dtype=torch.bool))
    m = count.multiplier
    assert m["lora"] == m["layout"] == m["alpha"] == 3 and m["backbone_attention"] == 3
    assert m["backbone_linear"] == m["assemble_linear"] == 2 and m["backbone_inputs"] == 1
    assert count.total_training == sum(v * m[k] for k, v in count.forward.items())
    set_trainable(model, STAGE_GROUPS[3])
    count = mpp_flops(model, batch=2, latent_hw=(12, 16), text_tokens=6, boxes=BOXES,
                      instance_mask=torch.ones(2, 3, dtype=torch.bool))
    assert count.multiplier["lora"] == 2 and count.multiplier["feedback"] == 3 and count.multiplier["alpha"] == 1
    step = StepFlops()
    step.add("x", 1, 2)
    with pytest.raises(ValueError, match="multipliers"):
        step.add("x", 1, 3)


def test_flux_dev_backbone_count():
    """FLUX.1-dev at 1024², batch 2: 57 blocks of 12·D² multiply-adds per token, joint attention over
    512 + 4096 tokens; built on the meta device."""
    model = build_flux_dev(heads=HeadsConfig(lora_rank=0))
    d, s, txt, b = 3072, 4096, 512, 2
    count = backbone_flops(model.backbone, batch=b, image_tokens=s, text_tokens=txt)
    blocks = FLUX_DEV_CONFIG["num_layers"] + FLUX_DEV_CONFIG["num_single_layers"]
    assert count.forward["backbone_linear"] == blocks * 24 * d * d * b * (s + txt) + 2 * b * s * d * 64
    assert count.forward["backbone_attention"] == blocks * b * 4 * (s + txt) ** 2 * d
    assert "lora" not in count.forward
    # forward ≈ 149 TFLOP; a training step (linear ×2, attention ×3) ≈ 327 TFLOP before LoRA and heads
    assert 148e12 < count.total_forward < 150e12
    assert 325e12 < count.total_training < 329e12
