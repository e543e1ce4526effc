"""Modulation offsets: only on tokens inside boxes, and on the right AdaLN chunks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import mpp.nn.model as model_mod
from mpp.nn.assemble_attn import build_layout
from mpp.nn.blocks import double_block_forward, single_block_forward
from mpp.nn.modulation import ModulationHead, box_coordinates
from mpp.nn.packing import box_token_mask
from tests.helpers import make_inputs, plain_forward, randomize

B, L, S = 2, 5, 12


def _stream(d, seed):
    gen = torch.Generator().manual_seed(seed)
    img, txt, temb = (torch.randn(B, S, d, generator=gen), torch.randn(B, L, d, generator=gen),
                      torch.randn(B, d, generator=gen))
    return img, txt, temb, gen


def _rope(backbone):
    ids = torch.cat([torch.zeros(L, 3), torch.stack([torch.zeros(S), torch.arange(S) // 4, torch.arange(S) % 4], 1)])
    return backbone.pos_embed(ids.float())


@pytest.mark.parametrize("chunk", range(6))
def test_double_block_offsets_hit_the_named_chunk(make_model, chunk):
    """A uniform offset on chunk i equals diffusers' block with the same offset in its AdaLN bias: fails if
    msa/mlp (or shift/scale/gate) chunks were mixed up."""
    model, plain = make_model()
    d = model.inner_dim
    img, txt, temb, gen = _stream(d, chunk)
    rope = _rope(plain)
    offset = torch.zeros(6 * d)
    offset[chunk * d:(chunk + 1) * d] = 0.5 * torch.randn(d, generator=gen)
    ref_block = copy.deepcopy(plain.transformer_blocks[1])
    with torch.no_grad():
        ref_block.norm1.linear.bias += offset
        ref_txt, ref_img = ref_block(img, txt, temb, rope)
        txt_o, img_o, _ = double_block_forward(
            model.backbone.transformer_blocks[1], img, txt, temb, rope, img_offsets=offset.expand(B, S, -1)
        )
        _, img_plain = plain.transformer_blocks[1](img, txt, temb, rope)
    torch.testing.assert_close(img_o, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt_o, ref_txt, atol=1e-5, rtol=1e-5)
    assert (img_o - img_plain).abs().max() > 1e-4


def test_single_block_per_token_offsets_match_manual(make_model):
    """Per-token offsets (different on every image token, none on text) against a hand-written single block."""
    model, plain = make_model()
    d = model.inner_dim
    img, txt, temb, gen = _stream(d, 7)
    rope = _rope(plain)
    offsets = 0.5 * torch.randn(B, S, 3 * d, generator=gen)
    block = plain.single_transformer_blocks[1]
    with torch.no_grad():
        txt_o, img_o, _ = single_block_forward(
            model.backbone.single_transformer_blocks[1], img, txt, temb, rope, img_offsets=offsets
        )
        # manual: AdaLN chunks rebuilt per token (text tokens: the block's own chunks)
        x = torch.cat([txt, img], 1)
        base = block.norm.linear(F.silu(temb))[:, None].expand(B, L + S, 3 * d)
        emb = base + torch.cat([torch.zeros(B, L, 3 * d), offsets], 1)
        shift, scale, gate = emb[..., :d], emb[..., d:2 * d], emb[..., 2 * d:]
        xn = F.layer_norm(x, (d,), eps=1e-6) * (1 + scale) + shift
        attn_out = block.attn(hidden_states=xn, image_rotary_emb=rope)
        mlp = block.act_mlp(block.proj_mlp(xn))
        ref = x + gate * block.proj_out(torch.cat([attn_out, mlp], -1))
    torch.testing.assert_close(torch.cat([txt_o, img_o], 1), ref, atol=1e-5, rtol=1e-5)


def test_model_offsets_only_inside_boxes(make_model, monkeypatch):
    model, plain = make_model()
    randomize(model, groups=("modulation",))
    inputs = make_inputs(seed=11, n=2, mask=torch.ones(2, 2, dtype=torch.bool))
    inputs["boxes"] = torch.tensor([[[0.0, 0.0, 0.3, 0.4], [0.5, 0.5, 0.7, 0.9]]] * 2)
    seen = []

    def spy(fn):
        def wrapped(*args, img_offsets=None, **kwargs):
            seen.append(img_offsets)
            return fn(*args, img_offsets=img_offsets, **kwargs)
        return wrapped

    monkeypatch.setattr(model_mod, "double_block_forward", spy(double_block_forward))
    monkeypatch.setattr(model_mod, "single_block_forward", spy(single_block_forward))
    with torch.no_grad():
        out = model(**inputs)
        ref = plain_forward(plain, inputs)
    assert len(seen) == len(model.layout_blocks)
    h, w = inputs["latents"].shape[-2:]
    inside = box_token_mask(inputs["boxes"], h // 2, w // 2).any(1)  # B×S
    for off in seen:
        assert (off[~inside] == 0).all()
        assert (off[inside].abs().sum(-1) > 0).all()
    assert (out.velocity - ref).abs().max() > 1e-4  # the modulation reaches the output


def _head_and_layout(grid: int, seed: int = 0):
    """A modulation head with random (non-zero) up weights and a layout of three overlapping boxes on an
    8×8 grid (two in sample 0, one in sample 1)."""
    torch.manual_seed(seed)
    head = ModulationHead(clip_dim=6, dino_dim=5, identity_dim=7, inner_dim=4, rank=3, chunks_per_block=[2],
                          grid=grid)
    for p in head.up.parameters():
        torch.nn.init.normal_(p)
    boxes = torch.tensor([[[0.1, 0.2, 0.6, 0.9], [0.4, 0.0, 1.0, 0.5]], [[0.0, 0.3, 0.7, 0.7], [0, 0, 0, 0]]])
    mask = torch.tensor([[True, True], [True, False]])
    layout = build_layout(boxes, mask, 8, 8)
    code = torch.randn(layout.num_pairs, 7)
    alpha = torch.tensor([0.3, 0.9, 0.6])
    return head, layout, boxes[layout.pair_b, layout.pair_k], code, alpha


def _bilinear(grid_map, fx, fy):
    """The value of an r×G×G map at box fractions (fx, fy), cell centres at (i + ½)/G, clamped at the edge."""
    g = grid_map.shape[-1]
    gx, gy = min(max(fx * g - 0.5, 0.0), g - 1.0), min(max(fy * g - 0.5, 0.0), g - 1.0)
    x0, y0 = int(gx), int(gy)
    x1, y1 = min(x0 + 1, g - 1), min(y0 + 1, g - 1)
    wx, wy = gx - x0, gy - y0
    return ((1 - wy) * ((1 - wx) * grid_map[:, y0, x0] + wx * grid_map[:, y0, x1])
            + wy * ((1 - wx) * grid_map[:, y1, x0] + wx * grid_map[:, y1, x1]))


@pytest.mark.parametrize("grid", [1, 3])
def test_offsets_match_a_per_token_loop(grid):
    """Every token's offset is the α-weighted mean over its boxes of up(map read at the token's place in
    the box): a loop over tokens and boxes, against the vectorized head (grid 1: one value per box)."""
    head, layout, boxes, code, alpha = _head_and_layout(grid)
    with torch.no_grad():
        out = head.offsets(0, code, layout, head.reading(layout, boxes, alpha))
        maps = head.down[0](code).view(-1, 3, grid, grid)
        ref = torch.zeros_like(out)
        gh, gw = layout.grid
        for s in range(gh * gw):
            r, c = divmod(s, gw)
            for b in range(out.shape[0]):
                pairs = [p for p in range(layout.num_pairs) if layout.pair_b[p] == b
                         and layout.member[b, layout.pair_k[p], s]]
                for p in pairs:
                    x0, y0, x1, y1 = boxes[p].tolist()
                    value = _bilinear(maps[p], ((c + 0.5) / gw - x0) / (x1 - x0), ((r + 0.5) / gh - y0) / (y1 - y0))
                    ref[b, s] += alpha[p] * head.up[0](value) / len(pairs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    outside = ~layout.member.any(1)
    assert (out[outside] == 0).all() and outside.any()


def test_a_grid_varies_inside_the_box_and_grid_one_does_not():
    for grid, varies in ((1, False), (4, True)):
        head, layout, boxes, code, alpha = _head_and_layout(grid, seed=1)
        with torch.no_grad():
            out = head.offsets(0, code, layout, head.reading(layout, boxes, alpha))
        only_box = layout.member[1, 0] & ~layout.member[1, 1]  # sample 1 has one box
        spread = out[1, only_box].std(0).max()
        assert (spread > 1e-3) == varies, (grid, spread)


def test_a_flat_map_equals_one_offset_per_box():
    """Reading a map that is the same in every cell gives grid 1's offsets: the grid only adds where."""
    flat, layout, boxes, code, alpha = _head_and_layout(1)
    gridded = ModulationHead(6, 5, 7, 4, 3, [2], grid=4)
    gridded.load_state_dict({k: v for k, v in flat.state_dict().items() if not k.startswith("down")}, strict=False)
    with torch.no_grad():
        gridded.down[0].weight.copy_(flat.down[0].weight.repeat_interleave(16, dim=0))
        torch.testing.assert_close(gridded.offsets(0, code, layout, gridded.reading(layout, boxes, alpha)),
                                   flat.offsets(0, code, layout, flat.reading(layout, boxes, alpha)),
                                   atol=1e-6, rtol=1e-6)


def test_box_coordinates_put_the_box_edges_at_minus_and_plus_one():
    where = box_coordinates(torch.tensor([[0.0, 0.25, 0.5, 0.75]]), 4, 4)  # 4×4 grid, token centres at k/4 + 1/8
    assert where.shape == (1, 16, 2)
    assert where[0, 0].tolist() == [-0.5, -1.5]  # token (0, 0): a quarter into the box's width, above it
    assert where[0, 1 * 4 + 1].tolist() == [0.5, -0.5]  # token (1, 1): three quarters across, a quarter down


def test_modulation_grid_below_one_names_the_flag():
    with pytest.raises(ValueError, match="heads.modulation_grid"):
        ModulationHead(6, 5, 7, 4, 3, [2], grid=0)


def _offset_calls(model, monkeypatch) -> list[int]:
    """Counts the calls of the model's modulation offsets (the real method still runs)."""
    calls = []
    real = model.modulation.offsets

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(model.modulation, "offsets", counted)
    return calls


def test_stage1_skips_the_zero_modulation_offsets_with_identical_results(make_model, monkeypatch):
    """Stage 1: the modulation head is frozen at its zero-initialized `up` layers, so its offsets are
    skipped; outputs and gradients equal those of computing them."""
    model, _ = make_model()
    model_mod.set_trainable(model, model_mod.STAGE_GROUPS[1])
    randomize(model, groups=("layout", "feedback", "lora"))
    inputs = make_inputs(seed=5)
    calls = _offset_calls(model, monkeypatch)
    results = []
    for skip in (True, False):
        model.skip_zero_work = skip
        model.zero_grad()
        out = model(**inputs)
        (out.velocity.square().mean() + out.alpha.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads, len(calls)))
    (a, grads_a, calls_skip), (b, grads_b, calls_all) = results
    assert calls_skip == 0 and calls_all == len(model.layout_blocks)
    assert torch.equal(a.velocity, b.velocity) and torch.equal(a.alpha, b.alpha)
    torch.testing.assert_close(a.feedback_magnitude, b.feedback_magnitude, atol=0, rtol=0)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=0, rtol=0)


def test_zero_modulation_check_is_cached_and_sees_loaded_or_trained_weights(make_model, monkeypatch):
    model, _ = make_model()
    model_mod.set_trainable(model, model_mod.STAGE_GROUPS[3])  # modulation frozen
    assert model.modulation_is_zero()
    cached = model._modulation_zero
    assert model.modulation_is_zero() and model._modulation_zero is cached  # no second look at the weights
    # stage 3 loads stage 2's trained (non-zero) modulation weights into the frozen head
    trained = {k: torch.full_like(v, 0.1) for k, v in model.modulation.state_dict().items()}
    model.modulation.load_state_dict(trained)
    assert not model.modulation_is_zero()
    calls = _offset_calls(model, monkeypatch)
    with torch.no_grad():
        model(**make_inputs(seed=6))
    assert len(calls) == len(model.layout_blocks)
    # a trained head is never skipped, even while its weights are still zero
    fresh, _ = make_model()
    model_mod.set_trainable(fresh, model_mod.STAGE_GROUPS[2])
    assert not fresh.modulation_is_zero()
