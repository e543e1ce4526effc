"""Assemble-Attn: batched == naive per-instance reference, locality, padding, overlap averaging."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import FluxPosEmbed, apply_rotary_emb

from mpp.nn.assemble_attn import (
    BUCKET_OVERHEAD,
    assemble_double,
    assemble_sdpa,
    assemble_single,
    box_centre_ids,
    box_mean,
    build_layout,
    plan_buckets,
    scatter_mean,
)
from mpp.nn.lora import base_linear
from tests.helpers import make_inputs, random_boxes, randomize

GH, GW = 6, 8  # token grid
S = GH * GW


def naive_member(box, gh=GH, gw=GW) -> torch.Tensor:
    """Token-by-token reference of the membership rule: patch centre in the closed box, plus the centre token."""
    x0, y0, x1, y1 = box.tolist()
    m = torch.zeros(gh * gw, dtype=torch.bool)
    for r in range(gh):
        for c in range(gw):
            cx, cy = (c + 0.5) / gw, (r + 0.5) / gh
            m[r * gw + c] = x0 <= cx <= x1 and y0 <= cy <= y1
    cc = min(max(int((x0 + x1) / 2 * gw), 0), gw - 1)
    cr = min(max(int((y0 + y1) / 2 * gh), 0), gh - 1)
    m[cr * gw + cc] = True
    return m


def naive_assemble(kind, block, img_norm, inst, mask, boxes, chunks, rope, out_proj, pos_embed=None):
    """Per-(batch, instance) Python loop: attention over [instance token ∥ in-box tokens], unbatched.
    With ``pos_embed`` the instance token's q and k take the RoPE of its box centre on the token grid."""
    attn = block.attn
    b, s, d = img_norm.shape
    hd = attn.head_dim
    acc = torch.zeros(b, s, d)
    cnt = torch.zeros(b, s, 1)
    new_inst = []
    p = 0
    for bi in range(b):
        for k in range(mask.shape[1]):
            if not mask[bi, k]:
                continue
            sel = naive_member(boxes[bi, k]).nonzero().squeeze(1)
            x = img_norm[bi, sel]  # M×D, LoRA always on inside the branch: call the (peft) modules
            e = inst[p][None]
            c = [t[bi] for t in chunks]
            if kind == "double":
                en = block.norm1_context.norm(e) * (1 + c[1]) + c[0]
                eq, ek, ev = attn.add_q_proj(en), attn.add_k_proj(en), attn.add_v_proj(en)
                eq = attn.norm_added_q(eq.view(1, -1, hd))
                ek = attn.norm_added_k(ek.view(1, -1, hd))
            else:
                en = block.norm.norm(e) * (1 + c[1]) + c[0]
                eq, ek, ev = attn.to_q(en), attn.to_k(en), attn.to_v(en)
                eq, ek = attn.norm_q(eq.view(1, -1, hd)), attn.norm_k(ek.view(1, -1, hd))
            if pos_embed is not None:
                x0, y0, x1, y1 = boxes[bi, k].tolist()
                centre = torch.tensor([[0.0, (y0 + y1) / 2 * GH - 0.5, (x0 + x1) / 2 * GW - 0.5]])
                eq = apply_rotary_emb(eq[None], pos_embed(centre), sequence_dim=1)[0]
                ek = apply_rotary_emb(ek[None], pos_embed(centre), sequence_dim=1)[0]
            q = attn.norm_q(attn.to_q(x).view(len(sel), -1, hd))
            kk = attn.norm_k(attn.to_k(x).view(len(sel), -1, hd))
            v = attn.to_v(x).view(len(sel), -1, hd)
            cos, sin = rope[0][sel], rope[1][sel]
            q = apply_rotary_emb(q[None], (cos, sin), sequence_dim=1)[0]
            kk = apply_rotary_emb(kk[None], (cos, sin), sequence_dim=1)[0]
            Q = torch.cat([eq, q]).transpose(0, 1)  # H×(1+M)×hd
            K = torch.cat([ek, kk]).transpose(0, 1)
            V = torch.cat([ev.view(1, -1, hd), v]).transpose(0, 1)
            o = F.scaled_dot_product_attention(Q, K, V).transpose(0, 1).reshape(1 + len(sel), d)
            if kind == "double":
                img_o = attn.to_out[0](o[1:])
                e = e + c[2] * attn.to_add_out(o[:1])
                e = e + c[5] * block.ff_context(block.norm2_context(e) * (1 + c[4]) + c[3])
            else:
                img_o = o[1:] @ block.proj_out.weight[:, :d].T
                mlp = block.act_mlp(block.proj_mlp(en))
                e = e + c[2] * block.proj_out(torch.cat([o[:1], mlp], -1))
            acc[bi, sel] += out_proj(img_o)
            cnt[bi, sel] += 1
            new_inst.append(e[0])
            p += 1
    return acc / cnt.clamp(min=1), (torch.stack(new_inst) if new_inst else inst)


def setup_branch(model, kind, b, n, seed, mask=None, boxes=None, bucket_overhead=BUCKET_OVERHEAD):
    """Random inputs of one layout block's Assemble-Attn branch."""
    gen = torch.Generator().manual_seed(seed)
    block = model.backbone.transformer_blocks[0] if kind == "double" else model.backbone.single_transformer_blocks[0]
    slot = 0 if kind == "double" else len(model.layout_double_blocks)
    d = model.inner_dim
    if boxes is None:
        boxes = random_boxes(gen, b, n)
    if mask is None:
        mask = torch.rand(b, n, generator=gen) < 0.8
    layout = build_layout(boxes, mask, GH, GW, bucket_overhead)
    img_norm = torch.randn(b, S, d, generator=gen)
    inst = torch.randn(layout.num_pairs, d, generator=gen)
    temb = torch.randn(b, d, generator=gen)
    norm = block.norm1_context if kind == "double" else block.norm
    chunks = norm.linear(F.silu(temb)).chunk(6 if kind == "double" else 3, dim=1)
    hd = block.attn.head_dim
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(GH)), torch.arange(float(GW)),
                                     indexing="ij"), -1).reshape(-1, 3)
    rope = model.backbone.pos_embed(ids)
    assert rope[0].shape == (S, hd)
    return dict(block=block, layout=layout, img_norm=img_norm, inst=inst, chunks=chunks, rope=rope,
                out_proj=model.layout_proj[slot], boxes=boxes, mask=mask, pos_embed=model.backbone.pos_embed)


def run_batched(kind, c, lora_in_base=False, inst_rope=False):
    attn = c["block"].attn
    proj = (lambda m, x: m(x)) if lora_in_base else base_linear
    qkv = tuple(proj(m, c["img_norm"]) for m in (attn.to_q, attn.to_k, attn.to_v))
    fn = assemble_double if kind == "double" else assemble_single
    layout = c["layout"]
    centres = None
    if inst_rope:
        centres = c["pos_embed"](box_centre_ids(c["boxes"][layout.pair_b, layout.pair_k], GH, GW))
    return fn(c["block"], layout, c["img_norm"], qkv, c["inst"], c["chunks"], c["rope"], c["out_proj"],
              add_lora=not lora_in_base, inst_rope=centres)


def run_naive(kind, c, inst_rope=False):
    return naive_assemble(kind, c["block"], c["img_norm"], c["inst"], c["mask"], c["boxes"], c["chunks"], c["rope"],
                          c["out_proj"], c["pos_embed"] if inst_rope else None)


def test_membership_matches_naive_rule():
    gen = torch.Generator().manual_seed(0)
    boxes = random_boxes(gen, 3, 7)
    mask = torch.ones(3, 7, dtype=torch.bool)
    layout = build_layout(boxes, mask, GH, GW)
    for bi in range(3):
        for k in range(7):
            assert torch.equal(layout.member[bi, k], naive_member(boxes[bi, k]))
    assert (layout.count_pair >= 1).all()


@pytest.mark.parametrize("kind", ["double", "single"])
@pytest.mark.parametrize("n", [0, 1, 7])
@pytest.mark.parametrize("lora_in_base", [False, True])
def test_batched_equals_naive(make_model, kind, n, lora_in_base):
    model, _ = make_model(lora_scope="all" if lora_in_base else "layout")
    randomize(model)
    c = setup_branch(model, kind, b=3, n=n, seed=n)
    with torch.no_grad():
        contrib, inst = run_batched(kind, c, lora_in_base)
        ref_contrib, ref_inst = run_naive(kind, c)
    torch.testing.assert_close(contrib, ref_contrib, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inst, ref_inst, atol=1e-5, rtol=1e-5)
    if n:
        assert contrib.abs().max() > 1e-3
        outside = ~c["layout"].member.any(1)
        assert (contrib[outside] == 0).all()


# one full-frame background box, small boxes of a few sizes (two of them equal, one smaller than a token,
# one inside another), so the pairs fall into several buckets, some padded and masked, some not
FRAME_AND_SMALL = torch.tensor([
    [[0.0, 0.0, 1.0, 1.0], [0.1, 0.1, 0.35, 0.45], [0.6, 0.5, 0.85, 0.95], [0.5, 0.5, 0.505, 0.51],
     [0.0, 0.6, 0.5, 1.0], [0.15, 0.15, 0.3, 0.3]],
    [[0.55, 0.1, 0.8, 0.45], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.55, 0.75], [0.2, 0.2, 0.3, 0.3],
     [0.7, 0.7, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]],
])


@pytest.mark.parametrize("kind", ["double", "single"])
@pytest.mark.parametrize("inst_rope", [False, True])
@pytest.mark.parametrize("case", ["frame_and_small", "random", "one_sample_empty", "all_empty"])
def test_exact_work_equals_naive(make_model, kind, inst_rope, case):
    model, _ = make_model()
    randomize(model)
    boxes, mask = FRAME_AND_SMALL, torch.ones(2, 6, dtype=torch.bool)
    mask[0, 2] = False  # a padding slot between valid instances
    if case == "random":
        boxes, mask = random_boxes(torch.Generator().manual_seed(3), 2, 6), None
    elif case == "one_sample_empty":
        mask[1] = False
    elif case == "all_empty":
        mask[:] = False
    # a small bucket overhead, so that the tiny grid's boxes still split into several buckets
    c = setup_branch(model, kind, b=2, n=6, seed=4, boxes=boxes, mask=mask, bucket_overhead=40)
    layout = c["layout"]
    if case == "frame_and_small":
        assert len(layout.buckets) >= 2 and any(bk.keep is not None for bk in layout.buckets)
        assert layout.num_packed == int(layout.count_pair.sum())  # nothing padded outside attention
    with torch.no_grad():
        contrib, inst = run_batched(kind, c, inst_rope=inst_rope)
        ref_contrib, ref_inst = run_naive(kind, c, inst_rope=inst_rope)
    torch.testing.assert_close(contrib, ref_contrib, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inst, ref_inst, atol=1e-5, rtol=1e-5)
    assert inst.shape == (layout.num_pairs, model.inner_dim)


def test_buckets_cover_every_pair_once_and_keep_big_boxes_apart():
    boxes = FRAME_AND_SMALL
    layout = build_layout(boxes, torch.ones(2, 6, dtype=torch.bool), 16, 16)
    counts = layout.count_pair.tolist()
    seen = sorted(p for bk in layout.buckets for p in bk.pairs.tolist())
    assert seen == list(range(layout.num_pairs))
    assert layout.pair_order[layout.pair_rank].tolist() == list(range(layout.num_pairs))
    for bk in layout.buckets:
        lengths = [counts[p] for p in bk.pairs.tolist()]
        assert bk.length == max(lengths) and bk.end - bk.start == sum(lengths)
        assert (bk.keep is None) == (min(lengths) == bk.length)
    full = [bk for bk in layout.buckets if bk.length == 256]
    assert len(full) == 1 and full[0].size == 3  # the three full-frame boxes, alone in their bucket
    # packed entries: each pair's own tokens, pair after pair
    for p in range(layout.num_pairs):
        rank = int(layout.pair_rank[p])
        before = sum(counts[q] for q in layout.pair_order[:rank].tolist())
        sel = slice(before, before + counts[p])
        assert (layout.token_b[sel] == layout.pair_b[p]).all()
        assert layout.member[layout.pair_b[p], layout.pair_k[p]].nonzero().squeeze(1).tolist() == \
            layout.token_s[sel].tolist()


def test_plan_buckets_minimises_padding_plus_overhead():
    assert plan_buckets([]) == []
    assert plan_buckets([5, 5, 5], overhead=0) == [[0, 1, 2]]
    # without overhead every distinct size gets its own call; with a huge one everything shares one
    assert plan_buckets([10, 400, 12], overhead=0) == [[1], [2], [0]]
    assert plan_buckets([10, 400, 12], overhead=10**9) == [[1, 2, 0]]
    # the worst case of the padded algorithm: a full frame and seven 10 % boxes
    assert plan_buckets([4096] + [410] * 7) == [[0], [1, 2, 3, 4, 5, 6, 7]]


@pytest.mark.parametrize("kind", ["double", "single"])
def test_locality_outside_tokens_do_not_matter(make_model, kind):
    model, _ = make_model()
    randomize(model)
    boxes = torch.tensor([[[0.0, 0.0, 0.4, 0.5], [0.3, 0.2, 0.7, 0.6]], [[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.1, 0.1]]])
    c = setup_branch(model, kind, b=2, n=2, seed=1, boxes=boxes, mask=torch.ones(2, 2, dtype=torch.bool))
    outside = ~c["layout"].member.any(1)  # B×S
    assert outside.any() and (~outside).any()
    with torch.no_grad():
        contrib, inst = run_batched(kind, c)
        c["img_norm"] = c["img_norm"] + 5.0 * torch.randn_like(c["img_norm"]) * outside[..., None]
        contrib2, inst2 = run_batched(kind, c)
    torch.testing.assert_close(contrib2[~outside], contrib[~outside], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(inst2, inst, atol=1e-6, rtol=1e-6)
    assert (contrib2[outside] == 0).all()

    # an instance token's update gets gradient only from the tokens inside its own box
    c["img_norm"].requires_grad_(True)
    _, inst = run_batched(kind, c)
    for p in range(c["layout"].num_pairs):
        (g,) = torch.autograd.grad(inst[p].square().sum(), c["img_norm"], retain_graph=True)
        touched = g.abs().sum(-1) > 0  # B×S
        own = torch.zeros_like(touched)
        own[c["layout"].pair_b[p]] = c["layout"].member[c["layout"].pair_b[p], c["layout"].pair_k[p]]
        assert torch.equal(touched, own)


def test_padding_instances_change_nothing(make_model):
    model, _ = make_model()
    randomize(model)
    base = make_inputs(seed=2, n=3, mask=torch.ones(2, 3, dtype=torch.bool))
    padded = make_inputs(seed=9, n=5)  # junk in the two extra slots
    for key in ("boxes", "instance_text", "clip_embeds", "dino_embeds"):
        padded[key][:, :3] = base[key]
    for key in ("latents", "timesteps", "prompt_embeds", "pooled_prompt_embeds", "guidance"):
        padded[key] = base[key]
    padded["instance_mask"] = torch.tensor([[1, 1, 1, 0, 0]] * 2, dtype=torch.bool)
    with torch.no_grad():
        a, b = model(**base), model(**padded)
    torch.testing.assert_close(b.velocity, a.velocity, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b.alpha[:, :3], a.alpha)
    assert (b.alpha[:, 3:] == 0).all()
    torch.testing.assert_close(b.feedback_magnitude, a.feedback_magnitude)
    assert a.feedback_magnitude > 0


def _two_box_layout():
    # 1×4 grid: box A covers tokens 0-1, box B covers tokens 1-2, token 3 is in no box
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 1.0], [0.25, 0.0, 0.75, 1.0]]])
    layout = build_layout(boxes, torch.ones(1, 2, dtype=torch.bool), 1, 4)
    assert layout.member[0].int().tolist() == [[1, 1, 0, 0], [0, 1, 1, 0]]
    return layout


def test_overlaps_are_averaged_not_overwritten():
    layout = _two_box_layout()
    # per-(instance, token) values: instance A outputs 1, instance B outputs 3 on every one of its tokens
    values = torch.tensor([1.0, 3.0])[layout.pair_k[layout.pair_order].repeat_interleave(2)][:, None].expand(-1, 2)
    out = scatter_mean(values, layout)
    assert out[0, :, 0].tolist() == [1.0, 2.0, 3.0, 0.0]
    # mean-pooling inside each box (the feedback bridge's input)
    x = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    assert box_mean(x, layout)[:, 0].tolist() == [1.5, 3.0]


def test_box_centre_ids_sit_at_the_mean_of_the_box_tokens():
    ids = box_centre_ids(torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.0, 0.5, 0.125, 1.0]]), 8, 8)
    # the first box covers tokens 2..5 on both axes; the second rows 4..7 and column 0
    assert torch.allclose(ids, torch.tensor([[0.0, 3.5, 3.5], [0.0, 5.5, 0.0]]))


@pytest.mark.parametrize("with_rope", [True, False])
def test_instance_rope_makes_instance_scores_depend_on_relative_position_only(with_rope):
    g = torch.Generator().manual_seed(0)
    heads, hd, m = 2, 16, 5
    pos = FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])
    inst = tuple(torch.randn(1, heads, hd, generator=g) for _ in range(3))
    img = tuple(torch.randn(m, heads, hd, generator=g) for _ in range(3))  # packed: one pair of m tokens
    layout = build_layout(torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]), torch.ones(1, 1, dtype=torch.bool), 1, m)
    rows = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0])
    cols = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0])

    def run(shift):
        ids = torch.stack([torch.zeros(m), rows + shift, cols + 2 * shift], -1)
        centre = torch.tensor([[0.0, 2.0 + shift, 1.5 + 2 * shift]])
        inst_rope = pos(centre) if with_rope else None
        return assemble_sdpa(inst, img, pos(ids), layout, inst_rope)

    (a_inst, a_img), (b_inst, b_img) = run(0.0), run(3.0)
    # moving the box and its tokens together changes nothing exactly when the instance token has a position
    assert torch.allclose(a_inst, b_inst, atol=1e-5) == with_rope
    assert torch.allclose(a_img, b_img, atol=1e-5) == with_rope
