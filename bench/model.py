"""Forward+backward time of MppFlux (all heads, 8 instances) versus the bare diffusers FLUX transformer
with only a peft LoRA (same rank, on every block's attention projections), same config and inputs.

    python bench/model.py [--repeats 10] [--scope layout] [--stage 2] [--grid 32] [--device cpu]

Runs are interleaved (bare, mpp, bare, mpp, ...) after a warm-up; prints the median of each and the
ratio mpp / bare (target: ≤ 1.3).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig

from mpp.nn import DEFAULT_GUIDANCE, STAGE_GROUPS, HeadsConfig, MppFlux, build_backbone, flux_velocity, set_trainable
from mpp.nn.lora import lora_parameters, lora_target_modules

CONFIG = {
    "in_channels": 64,
    "num_layers": 6,
    "num_single_layers": 12,
    "attention_head_dim": 32,
    "num_attention_heads": 8,
    "joint_attention_dim": 128,
    "pooled_projection_dim": 64,
    "guidance_embeds": True,
    "axes_dims_rope": [8, 12, 12],
}
CLIP, DINO, TEXT = 64, 96, 64


def inputs(batch: int, grid: int, instances: int, txt_len: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(batch, instances, 2, generator=g) * 0.6
    wh = 0.15 + torch.rand(batch, instances, 2, generator=g) * 0.4
    boxes = torch.cat([xy, (xy + wh).clamp(max=1.0)], -1)
    d = {
        "latents": torch.randn(batch, 16, grid, grid, generator=g),
        "timesteps": torch.rand(batch, generator=g),
        "prompt_embeds": torch.randn(batch, txt_len, CONFIG["joint_attention_dim"], generator=g),
        "pooled_prompt_embeds": torch.randn(batch, CONFIG["pooled_projection_dim"], generator=g),
        "boxes": boxes,
        "instance_mask": torch.ones(batch, instances, dtype=torch.bool),
        "instance_text": torch.randn(batch, instances, TEXT, generator=g),
        "clip_embeds": torch.randn(batch, instances, CLIP, generator=g),
        "dino_embeds": torch.randn(batch, instances, DINO, generator=g),
        "guidance": torch.full((batch,), DEFAULT_GUIDANCE),
    }
    return {k: v.to(device) for k, v in d.items()}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--grid", type=int, default=32, help="latent side (tokens = (grid/2)^2)")
    p.add_argument("--instances", type=int, default=8)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--scope", default="layout", choices=["layout", "all"])
    p.add_argument("--stage", type=int, default=2, choices=[1, 2, 3])
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    x = inputs(args.batch, args.grid, args.instances, 64, dev)
    h = w = args.grid

    bare = build_backbone(config=CONFIG).to(dev).train()
    bare.requires_grad_(False)
    bare.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=lora_target_modules(
        range(CONFIG["num_layers"]), range(CONFIG["num_single_layers"]))))
    for q in lora_parameters(bare):
        q.requires_grad_(True)

    backbone = build_backbone(config=CONFIG)
    model = MppFlux(backbone, clip_dim=CLIP, dino_dim=DINO, text_dim=TEXT,
                    heads=HeadsConfig(lora_rank=args.rank, lora_scope=args.scope)).to(dev).train()
    set_trainable(model, STAGE_GROUPS[args.stage])

    def run_bare():
        flux_velocity(bare, x["latents"], x["timesteps"], x["prompt_embeds"], x["pooled_prompt_embeds"]
                      ).square().mean().backward()

    def run_mpp():
        out = model(**x)
        (out.velocity.square().mean() + out.alpha.mean()).backward()

    times = {"bare": [], "mpp": []}
    for step in range(args.repeats + 2):
        for name, fn in (("bare", run_bare), ("mpp", run_mpp)):
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            if step >= 2:  # warm-up
                times[name].append(time.perf_counter() - t0)
    tb, tm = statistics.median(times["bare"]), statistics.median(times["mpp"])
    print(f"config: {CONFIG['num_layers']}+{CONFIG['num_single_layers']} blocks, width "
          f"{CONFIG['num_attention_heads'] * CONFIG['attention_head_dim']}, {(h // 2) * (w // 2)} image tokens, "
          f"batch {args.batch}, {args.instances} instances, LoRA rank {args.rank}, mpp scope {args.scope}, "
          f"stage {args.stage}, device {dev}, threads {torch.get_num_threads()}")
    print(f"bare diffusers + LoRA (all): {tb * 1000:.1f} ms   mpp: {tm * 1000:.1f} ms   ratio {tm / tb:.2f}x")


if __name__ == "__main__":
    main()
