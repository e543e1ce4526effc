"""Assemble-Attn's worst case on the CPU: one full-frame background box plus seven boxes of ~10 % area
per sample, at a real token grid, timed with the padded algorithm mpp used until issue 15 (every
(sample, instance) pair padded to the largest box, one masked SDPA call; kept below as the reference)
and with the exact-work one (`mpp.nn.assemble_attn`: packed tokens, size buckets).

    python bench/assemble_attn.py [--grid 64] [--heads 2] [--head-dim 128] [--batch 1] [--repeats 3]
                                  [--rank 16] [--forward-only]

Both algorithms run the same block weights (one FLUX double and one single block of the given width,
LoRA in the layout scope, random non-zero heads) on the same inputs; arms alternate after a warm-up,
and each reports its median forward (+ backward) time per block kind. FLOPs: the attention scores and
value products over the keys each algorithm attends to (4·(1+m)²·D per pair of m tokens; padded: the
largest box's m for every pair), and every matmul the branch executes (torch's FlopCounterMode, one
forward with the math attention kernel, so that attention counts too). Prints a table, then ONE JSON
line. Check: both algorithms give the same outputs (max abs difference printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mpp.nn import HeadsConfig, MppFlux, build_backbone
from mpp.nn.assemble_attn import (
    _head_linear,
    _instance_qkv,
    assemble_double,
    assemble_single,
    build_layout,
)
from mpp.nn.attention import apply_rope, sdpa, split_heads
from mpp.nn.lora import add_delta, base_linear, project

CLIP, DINO, TEXT = 64, 96, 64


def worst_case_boxes(batch: int) -> torch.Tensor:
    """B×8×4: a full-frame box, then seven boxes of side √0.1 (10 % of the frame) spread over it."""
    side = 0.1**0.5
    corners = [(0.02, 0.03), (0.40, 0.05), (0.66, 0.10), (0.05, 0.45), (0.35, 0.38), (0.64, 0.52), (0.30, 0.66)]
    boxes = [[0.0, 0.0, 1.0, 1.0]] + [[x, y, x + side, y + side] for x, y in corners]
    return torch.tensor(boxes).expand(batch, -1, -1).contiguous()


# ---- the padded algorithm (mpp.nn.assemble_attn before issue 15), the reference this bench measures

def padded_indices(layout) -> tuple[torch.Tensor, torch.Tensor]:
    """P×M token indices inside each pair's box (0 in padding slots) and the P×M validity mask."""
    member_p = layout.member[layout.pair_b, layout.pair_k]
    m = int(layout.count_pair.max())
    idx = torch.argsort((~member_p).to(torch.uint8), dim=-1, stable=True)[:, :m]
    valid = torch.arange(m)[None, :] < layout.count_pair[:, None]
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


def padded_branch(kind: str, block, layout, img_norm, img_qkv, inst, chunks, rope_img, out_proj, add_lora: bool):
    idx, valid = padded_indices(layout)
    pb = layout.pair_b
    attn, hd = block.attn, block.attn.head_dim

    def gather(x):
        return x[pb[:, None], idx]

    if kind == "double":
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = (c[pb] for c in chunks)
        inst_n = block.norm1_context.norm(inst) * (1 + c_scale) + c_shift
        iq, ik, iv = _instance_qkv(inst_n, hd, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                                   (attn.norm_added_q, attn.norm_added_k))
    else:
        shift, scale, gate = (c[pb] for c in chunks)
        inst_n = block.norm.norm(inst) * (1 + scale) + shift
        iq, ik, iv = _instance_qkv(inst_n, hd, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
    gathered = [gather(t) for t in img_qkv]
    if add_lora:
        xg = gather(img_norm)
        gathered = [add_delta(t, m, xg) for t, m in zip(gathered, (attn.to_q, attn.to_k, attn.to_v), strict=True)]
    gq, gk, gv = (split_heads(t, hd) for t in gathered)
    cos, sin = rope_img[0][idx], rope_img[1][idx]
    gq, gk = apply_rope(attn.norm_q(gq), cos, sin), apply_rope(attn.norm_k(gk), cos, sin)
    q, k, v = (torch.cat([i.unsqueeze(1), g], 1) for i, g in ((iq, gq), (ik, gk), (iv, gv)))
    keep = torch.cat([valid.new_ones(valid.shape[0], 1), valid], 1)
    out = sdpa(q, k, v, keep[:, None, None, :])
    out_inst, out_img = out[:, 0], out[:, 1:]
    if kind == "double":
        out_img = attn.to_out[1](project(attn.to_out[0], out_img, True))
    else:
        out_img = F.linear(out_img, block.proj_out.weight[:, :out_img.shape[-1]])
    values = _head_linear(out_proj, out_img) * valid[..., None].to(out_img.dtype)
    b, s = layout.count_token.shape
    flat = (pb[:, None] * s + idx).reshape(-1)
    summed = values.new_zeros(b * s, values.shape[-1]).index_add_(0, flat, values.reshape(-1, values.shape[-1]))
    contrib = (summed / layout.count_token.clamp(min=1).to(values.dtype).reshape(-1, 1)).view(b, s, -1)
    if kind == "double":
        inst = inst + c_gate * project(attn.to_add_out, out_inst, True)
        inst = inst + c_gate_mlp * block.ff_context(block.norm2_context(inst) * (1 + c_scale_mlp) + c_shift_mlp)
    else:
        inst = inst + gate * block.proj_out(torch.cat([out_inst, block.act_mlp(block.proj_mlp(inst_n))], -1))
    return contrib, inst


# ---- the bench

def branch_inputs(model: MppFlux, kind: str, layout, batch: int, g: torch.Generator) -> dict:
    d = model.inner_dim
    block = model.backbone.transformer_blocks[0] if kind == "double" else model.backbone.single_transformer_blocks[0]
    gh, gw = layout.grid
    img_norm = torch.randn(batch, gh * gw, d, generator=g)
    temb = torch.randn(batch, d, generator=g)
    norm = block.norm1_context if kind == "double" else block.norm
    with torch.no_grad():
        chunks = norm.linear(F.silu(temb)).chunk(6 if kind == "double" else 3, dim=1)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(gh)), torch.arange(float(gw)),
                                     indexing="ij"), -1).reshape(-1, 3)
    slot = 0 if kind == "double" else len(model.layout_double_blocks)
    inst = torch.randn(layout.num_pairs, d, generator=g)
    return {"block": block, "layout": layout, "img_norm": img_norm, "inst": inst, "chunks": chunks,
            "rope": model.backbone.pos_embed(ids), "out_proj": model.layout_proj[slot]}


def run(kind: str, algorithm: str, x: dict, backward: bool):
    block, attn = x["block"], x["block"].attn
    img_norm = x["img_norm"].requires_grad_(backward)
    qkv = tuple(base_linear(m, img_norm) for m in (attn.to_q, attn.to_k, attn.to_v))
    args = (block, x["layout"], img_norm, qkv, x["inst"], x["chunks"], x["rope"], x["out_proj"])
    if algorithm == "padded":
        contrib, inst = padded_branch(kind, *args, add_lora=True)
    else:
        contrib, inst = (assemble_double if kind == "double" else assemble_single)(*args, add_lora=True)
    if backward:
        (contrib.square().mean() + inst.square().mean()).backward()
    return contrib.detach(), inst.detach()


def attention_flops(layout, width: int) -> dict[str, int]:
    """Score + value matmul FLOPs (forward) of the padded, bucketed and exact attention: 4·keys²·D per pair."""
    counts = layout.count_pair.tolist()
    per = 4 * width
    return {"padded": per * len(counts) * (1 + max(counts)) ** 2,
            "bucketed": per * sum(b.size * (1 + b.length) ** 2 for b in layout.buckets),
            "exact": per * sum((1 + m) ** 2 for m in counts)}


def executed_flops(kind: str, algorithm: str, x: dict) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run(kind, algorithm, x, backward=False)
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=int, default=64, help="token grid side (64: a 1024² image)")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (layout scope)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--forward-only", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    width = a.heads * a.head_dim
    config = {"in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": a.head_dim,
              "num_attention_heads": a.heads, "joint_attention_dim": 64, "pooled_projection_dim": 64,
              "guidance_embeds": True, "axes_dims_rope": [a.head_dim // 4, 3 * a.head_dim // 8, 3 * a.head_dim // 8]}
    model = MppFlux(build_backbone(config=config), clip_dim=CLIP, dino_dim=DINO, text_dim=TEXT,
                    heads=HeadsConfig(lora_rank=a.rank, lora_scope="layout")).train()
    with torch.no_grad():  # non-zero heads and LoRA B, so the outputs mean something
        for q in [*model.layout_proj.parameters(), *(q for n, q in model.named_parameters() if ".lora_B." in n)]:
            q.copy_(torch.randn(q.shape, generator=g) * 0.05)
    boxes = worst_case_boxes(a.batch)
    layout = build_layout(boxes, torch.ones(boxes.shape[:2], dtype=torch.bool), a.grid, a.grid)
    backward = not a.forward_only

    results = {}
    for kind in ("double", "single"):
        x = branch_inputs(model, kind, layout, a.batch, g)
        outs = {alg: run(kind, alg, x, backward=False) for alg in ("padded", "exact")}
        diff = max((o - e).abs().max().item() for o, e in zip(outs["padded"], outs["exact"], strict=True))
        times = {"padded": [], "exact": []}
        for i in range(a.repeats + 1):
            for alg in ("padded", "exact"):
                t0 = time.perf_counter()
                run(kind, alg, x, backward)
                if i:  # the first round is a warm-up
                    times[alg].append(time.perf_counter() - t0)
        results[kind] = {"padded_s": statistics.median(times["padded"]), "exact_s": statistics.median(times["exact"]),
                         "padded_flops": executed_flops(kind, "padded", x),
                         "exact_flops": executed_flops(kind, "exact", x), "max_abs_diff": diff}

    att = attention_flops(layout, width)
    counts = layout.count_pair.tolist()
    print(f"grid {a.grid}×{a.grid} ({a.grid * a.grid} tokens), width {width} ({a.heads} heads × {a.head_dim}), "
          f"batch {a.batch}, LoRA rank {a.rank}, {'forward' if a.forward_only else 'forward + backward'}, "
          f"threads {torch.get_num_threads()}")
    print(f"tokens per box: {counts[:8]}; buckets: {[(b.size, b.length) for b in layout.buckets]}")
    print(f"attention FLOPs (forward): padded {att['padded'] / 1e9:.1f} G, bucketed {att['bucketed'] / 1e9:.1f} G, "
          f"exact {att['exact'] / 1e9:.1f} G; padded/exact {att['padded'] / att['exact']:.2f}×")
    print(f"{'block':<8}{'padded s':>10}{'exact s':>10}{'speed-up':>10}{'padded GFLOP':>14}{'exact GFLOP':>13}"
          f"{'ratio':>8}{'max |diff|':>12}")
    for kind, r in results.items():
        print(f"{kind:<8}{r['padded_s']:>10.3f}{r['exact_s']:>10.3f}{r['padded_s'] / r['exact_s']:>9.2f}×"
              f"{r['padded_flops'] / 1e9:>14.1f}{r['exact_flops'] / 1e9:>13.1f}"
              f"{r['padded_flops'] / r['exact_flops']:>7.2f}×{r['max_abs_diff']:>12.1e}")
    print(json.dumps({
        "grid": a.grid, "width": width, "heads": a.heads, "batch": a.batch, "lora_rank": a.rank,
        "backward": backward, "tokens_per_box": counts, "buckets": [[b.size, b.length] for b in layout.buckets],
        "attention_gflop": {k: round(v / 1e9, 2) for k, v in att.items()},
        "attention_ratio": round(att["padded"] / att["exact"], 2),
        **{f"{kind}_{k}": (round(v, 3) if k.endswith("_s") else round(v / 1e9, 2) if k.endswith("flops") else v)
           for kind, r in results.items() for k, v in r.items()},
        **{f"{kind}_speedup": round(r["padded_s"] / r["exact_s"], 2) for kind, r in results.items()},
        **{f"{kind}_flop_ratio": round(r["padded_flops"] / r["exact_flops"], 2) for kind, r in results.items()},
    }))


if __name__ == "__main__":
    main()
