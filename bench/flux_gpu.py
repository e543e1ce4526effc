"""The real FLUX.1-dev transformer config with random bf16 weights on one GPU: peak memory and time of a
training step (forward, backward, AdamW) of MppFlux next to diffusers' own forward of the same backbone
with the same LoRA, same inputs, and each step's model-FLOP utilisation.

    python bench/flux_gpu.py [--resolution 1024] [--batch 2] [--instances 8] [--stage 1] [--scope all]
                             [--repeats 5] [--no-checkpointing] [--blocks 19,38] [--device cuda]
                             [--cudnn-attention] [--fused-adamw]
    python bench/flux_gpu.py --dry-run      # no GPU: FLOPs per micro-step and a memory estimate

Arms alternate (bare, mpp, bare, mpp, ...) after two warm-up steps each. Both arms share one backbone
in memory, so the LoRA scope defaults to `all` (the adapter runs in diffusers' forward too); with
`--scope layout` the bare arm runs the adapter where it is injected (the layout blocks), on every token.
Prints one JSON line: the weights' memory, each arm's median step time, peak memory, useful TFLOP/s
and MFU (`mpp.nn.flops`: analytic count, recompute not counted) against the card's bf16 matmul rate
measured here with a large matmul, and the time ratio mpp / bare.

`--dry-run` builds the same model on the meta device (nothing allocated, no weights) and prints, for
stage 1 and stage 2, the FLOPs of one micro-step (forward, training; bare arm; stage 2's identity
term's extra forward of `--dino-samples` samples, without its VAE decode and DINOv2) and a memory
estimate (`mpp.nn.memory`) with and without checkpointing, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from mpp.nn import DEFAULT_GUIDANCE, STAGE_GROUPS, HeadsConfig, MppFlux, flux_velocity, set_trainable
from mpp.nn.flops import backbone_flops, mpp_flops
from mpp.nn.memory import memory_estimate
from mpp.nn.params import FLUX_DEV_CONFIG, REAL_ENCODER_DIMS, count_parameters

GIB = 2**30
TXT_LEN = 512


def build(scope: str, checkpointing: bool, stage: int, blocks: tuple[int, int], device: torch.device) -> MppFlux:
    from diffusers import FluxTransformer2DModel

    config = {**FLUX_DEV_CONFIG, "num_layers": blocks[0], "num_single_layers": blocks[1]}
    torch.set_default_dtype(torch.bfloat16)  # 12B parameters: initialise them in bf16, on the GPU
    try:
        with device:
            backbone = FluxTransformer2DModel.from_config(config)
    finally:
        torch.set_default_dtype(torch.float32)
    if checkpointing:
        backbone.enable_gradient_checkpointing()  # for diffusers' own forward (the bare arm)
    with device:
        model = MppFlux(backbone, **REAL_ENCODER_DIMS,
                        heads=HeadsConfig(lora_rank=128, lora_scope=scope, gradient_checkpointing=checkpointing))
    set_trainable(model, STAGE_GROUPS[stage])
    return model.train()


def inputs(batch: int, resolution: int, instances: int, device: torch.device, txt_len: int = TXT_LEN) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    side = resolution // 8

    def rand(*shape):
        return torch.rand(*shape, generator=g, device=device)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    xy = rand(batch, instances, 2) * 0.6
    wh = 0.15 + rand(batch, instances, 2) * 0.4
    return {
        "latents": randn(batch, 16, side, side),
        "timesteps": rand(batch),
        "prompt_embeds": randn(batch, txt_len, FLUX_DEV_CONFIG["joint_attention_dim"]),
        "pooled_prompt_embeds": randn(batch, FLUX_DEV_CONFIG["pooled_projection_dim"]),
        "boxes": torch.cat([xy, (xy + wh).clamp(max=1.0)], -1),
        "instance_mask": torch.ones(batch, instances, dtype=torch.bool, device=device),
        "instance_text": randn(batch, instances, REAL_ENCODER_DIMS["text_dim"]),
        "clip_embeds": randn(batch, instances, REAL_ENCODER_DIMS["clip_dim"]),
        "dino_embeds": randn(batch, instances, REAL_ENCODER_DIMS["dino_dim"]),
        "guidance": torch.full((batch,), DEFAULT_GUIDANCE, device=device),
    }


def step_flops(model: MppFlux, batch: int, resolution: int, x: dict) -> dict[str, int]:
    """Useful training FLOPs of one micro-step of each arm (`mpp.nn.flops`)."""
    side = resolution // 8
    mpp = mpp_flops(model, batch=batch, latent_hw=(side, side), text_tokens=TXT_LEN, boxes=x["boxes"],
                    instance_mask=x["instance_mask"])
    bare = backbone_flops(model.backbone, batch=batch, image_tokens=(side // 2) ** 2, text_tokens=TXT_LEN)
    return {"mpp": mpp, "bare": bare}


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """The card's measured dense bf16 matmul rate (TFLOP/s): the ceiling MFU is reported against."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def dry_run(a, blocks: tuple[int, int]) -> dict:
    """FLOPs and a memory estimate of the real config on the meta device, for stages 1 and 2."""
    meta = torch.device("meta")
    x = inputs(a.batch, a.resolution, a.instances, torch.device("cpu"))
    side = a.resolution // 16
    report = {"blocks": blocks, "resolution": a.resolution, "batch": a.batch, "instances": a.instances,
              "lora_scope": a.scope, "stages": {}}
    print(f"FLUX.1-dev config {blocks}, {a.resolution}² ({side * side} image + {TXT_LEN} text tokens), "
          f"batch {a.batch}, {a.instances} instances, LoRA rank 128 scope {a.scope} (meta device, nothing allocated)")
    for stage in (1, 2):
        model = build(a.scope, True, stage, blocks, meta)
        flops = step_flops(model, a.batch, a.resolution, x)
        mpp, bare = flops["mpp"], flops["bare"]
        k = min(a.dino_samples, a.batch)
        identity = step_flops(model, k, a.resolution, {n: v[:k] for n, v in x.items()})["mpp"] if stage == 2 else None
        mem = {ck: memory_estimate(model, batch=a.batch, image_tokens=side * side, text_tokens=TXT_LEN,
                                   checkpointing=ck) for ck in (True, False)}
        trainable = count_parameters(q for q in model.parameters() if q.requires_grad)
        entry = {"trainable_params": trainable,
                 "mpp_forward_tflop": round(mpp.total_forward / 1e12, 1),
                 "mpp_training_tflop": round(mpp.total_training / 1e12, 1),
                 "bare_training_tflop": round(bare.total_training / 1e12, 1),
                 "mpp_training_tflop_by_item": {n: round(v / 1e12, 2) for n, v in sorted(mpp.training.items())},
                 "memory_gib": {("checkpointing" if ck else "no_checkpointing"):
                                {"weights": {dt: round(v / GIB, 2) for dt, v in m["weights"].items()},
                                 "optimizer_and_grads": round(m["optimizer_and_grads"] / GIB, 2),
                                 "activations": round(m["activations"] / GIB, 2), "total": round(m["total"] / GIB, 2)}
                                for ck, m in mem.items()}}
        if identity is not None:
            entry["identity_forward_samples"] = k
            entry["identity_training_tflop"] = round(identity.total_training / 1e12, 1)
        report["stages"][str(stage)] = entry
        print(f"\nstage {stage}: {trainable:,} trainable parameters")
        print(f"  FLOPs per micro-step: MppFlux forward {mpp.total_forward / 1e12:.1f} T, training "
              f"{mpp.total_training / 1e12:.1f} T (bare backbone + LoRA {bare.total_training / 1e12:.1f} T)")
        for item, v in sorted(mpp.training.items(), key=lambda kv: -kv[1]):
            print(f"    {item:<20}{v / 1e12:>9.2f} T  (×{mpp.multiplier[item]} of {mpp.forward[item] / 1e12:.2f} T)")
        if identity is not None:
            print(f"  identity term: its own forward of {k} samples adds {identity.total_training / 1e12:.1f} T "
                  f"(VAE decode and DINOv2 of the crops not counted)")
        for ck, m in mem.items():
            w = ", ".join(f"{dt} {v / GIB:.1f}" for dt, v in m["weights"].items())
            print(f"  memory, {'with' if ck else 'without'} checkpointing (GiB): weights {w}; grads + AdamW "
                  f"{m['optimizer_and_grads'] / GIB:.1f}; activations ≈ {m['activations'] / GIB:.1f}; "
                  f"total ≈ {m['total'] / GIB:.1f}")
    print(json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--instances", type=int, default=8)
    p.add_argument("--stage", type=int, default=1, choices=[1, 2, 3])
    p.add_argument("--scope", default="all", choices=["layout", "all"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--blocks", default="19,38", help="double,single blocks (FLUX.1-dev: 19,38)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--cudnn-attention", action="store_true",
                   help="allow cuDNN's attention kernels, which mpp's training turns off "
                        "(see MppModule.configure_model)")
    p.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True)")
    p.add_argument("--dry-run", action="store_true", help="no GPU: print FLOPs and a memory estimate, then exit")
    p.add_argument("--dino-samples", type=int, default=2,
                   help="samples in stage 2's identity forward (model.loss.dino_samples), for --dry-run")
    a = p.parse_args(argv)
    blocks = tuple(int(n) for n in a.blocks.split(","))
    if a.dry_run:
        return dry_run(a, blocks)
    torch.backends.cuda.enable_cudnn_sdp(a.cudnn_attention)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"

    model = build(a.scope, a.checkpointing, a.stage, blocks, dev)
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=a.fused_adamw)
    weights_gib = torch.cuda.memory_allocated() / GIB if cuda else 0.0
    x = inputs(a.batch, a.resolution, a.instances, dev)
    target = torch.randn(x["latents"].shape, device=dev)

    def step(name: str) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            if name == "bare":
                v = flux_velocity(model.backbone, x["latents"], x["timesteps"], x["prompt_embeds"],
                                  x["pooled_prompt_embeds"])
            else:
                v = model(**x).velocity
        F.mse_loss(v.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {"bare": [], "mpp": []}
    peaks = {"bare": 0.0, "mpp": 0.0}
    for i in range(a.repeats + 2):
        for name in ("bare", "mpp"):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(name)
            if cuda:
                torch.cuda.synchronize()
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / GIB)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    tb, tm = statistics.median(times["bare"]), statistics.median(times["mpp"])
    flops = {name: c.total_training for name, c in step_flops(model, a.batch, a.resolution, x).items()}
    peak = matmul_tflops(dev) if cuda else float("nan")
    rate = {name: flops[name] / t / 1e12 for name, t in (("bare", tb), ("mpp", tm))}
    report = {
        "device": torch.cuda.get_device_name() if cuda else a.device, "blocks": blocks, "resolution": a.resolution,
        "batch": a.batch,
        "instances": a.instances, "stage": a.stage, "lora_scope": a.scope, "gradient_checkpointing": a.checkpointing,
        "cudnn_attention": a.cudnn_attention,
        "trainable_params": count_parameters(trainable), "weights_gib": round(weights_gib, 2),
        "bare_step_s": round(tb, 3), "mpp_step_s": round(tm, 3), "ratio": round(tm / tb, 3),
        "bare_peak_gib": round(peaks["bare"], 2), "mpp_peak_gib": round(peaks["mpp"], 2),
        "matmul_tflops": round(peak, 1), "fused_adamw": a.fused_adamw,
        **{f"{name}_tflop": round(flops[name] / 1e12, 1) for name in ("bare", "mpp")},
        **{f"{name}_tflops": round(rate[name], 1) for name in ("bare", "mpp")},
        **{f"{name}_mfu": round(rate[name] / peak, 3) for name in ("bare", "mpp")},
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
