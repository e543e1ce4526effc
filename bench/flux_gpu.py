"""The real FLUX.1-dev transformer config with random bf16 weights on one GPU: peak memory and time of a
training step (forward, backward, AdamW) of MppFlux next to diffusers' own forward of the same backbone
with the same LoRA, same inputs.

    python bench/flux_gpu.py [--resolution 1024] [--batch 2] [--instances 8] [--stage 1] [--scope all]
                             [--repeats 5] [--no-checkpointing] [--blocks 19,38] [--device cuda]
                             [--cudnn-attention]

Arms alternate (bare, mpp, bare, mpp, ...) after two warm-up steps each. Both arms share one backbone
in memory, so the LoRA scope defaults to `all` (the adapter runs in diffusers' forward too); with
`--scope layout` the bare arm runs without the adapter. Prints one JSON line: the weights' memory,
each arm's median step time and peak memory, and the time ratio mpp / bare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from mpp.nn import DEFAULT_GUIDANCE, STAGE_GROUPS, HeadsConfig, MppFlux, flux_velocity, set_trainable
from mpp.nn.params import FLUX_DEV_CONFIG, REAL_ENCODER_DIMS, count_parameters

GIB = 2**30


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


def inputs(batch: int, resolution: int, instances: int, device: torch.device, txt_len: int = 512) -> dict:
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


def main() -> None:
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
    a = p.parse_args()
    torch.backends.cuda.enable_cudnn_sdp(a.cudnn_attention)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    blocks = tuple(int(n) for n in a.blocks.split(","))

    model = build(a.scope, a.checkpointing, a.stage, blocks, dev)
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
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
    print(json.dumps({
        "device": torch.cuda.get_device_name() if cuda else a.device, "blocks": blocks, "resolution": a.resolution,
        "batch": a.batch,
        "instances": a.instances, "stage": a.stage, "lora_scope": a.scope, "gradient_checkpointing": a.checkpointing,
        "cudnn_attention": a.cudnn_attention,
        "trainable_params": count_parameters(trainable), "weights_gib": round(weights_gib, 2),
        "bare_step_s": round(tb, 3), "mpp_step_s": round(tm, 3), "ratio": round(tm / tb, 3),
        "bare_peak_gib": round(peaks["bare"], 2), "mpp_peak_gib": round(peaks["mpp"], 2),
    }))


if __name__ == "__main__":
    main()
