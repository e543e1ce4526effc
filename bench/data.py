"""Samples/s of the DataModule (batch 8, 2 workers) versus a bare loop reading the same files.

    python bench/data.py [--root .cache/bench/toy_data_wide] [--samples 512] [--epochs 6]
                         [--aspect_ratios 1 1.7778 2.39]
    python bench/data.py --flux_sized [--root .cache/bench/flux_sized_data] [--samples 192] [--batch_size 2]

The toy data comes in square, 16:9 and 2.39:1 frames (three buckets) unless --aspect_ratios 1, so
the DataModule batches within buckets as training does.

Builds the toy dataset on first use. Two bare loops read every file of every training sample in
the main process: `bare_read` with `safetensors.torch.load_file` (the plain way; the target is the
DataModule at ≥ 0.9× its rate) and `bare_read_same_reader` with the DataModule's own reader
(`mpp.data.layout.read_tensors`, which is faster on small files), whose ratio is the DataModule's
whole overhead (validation, padding, the workers' hand-off). Prints a table and one JSON line:
medians over epochs and the medians of the paired per-epoch ratios.

`--flux_sized` measures the same at FLUX.1's sizes instead of the toy's: random tensors of the shapes
a 1024-px FLUX.1-dev dataset stores (latents 16×H/8×W/8, T5 states 512×4096, CLIP-L and DINOv2-L
embeddings, bfloat16; about 4.7 MB a sample) in three buckets, with config-only encoder folders
that give those widths, written through the project's own writers; the real per-GPU batch is 2.

The DataModule's host side is timed: the workers and `on_before_batch_transfer` (unpacking, the
bad-record count), not `on_after_batch_transfer`, whose casts to float32 run on the accelerator
after the transfer in training (on this CPU they cost a FLUX-sized batch more than its reading).
The main process runs one intra-op thread: with two, OpenMP threads spinning there took the
workers' cores (toy data: 2706 vs 3594 samples/s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPVisionConfig, Dinov2Config, T5Config

from mpp.data.buckets import Buckets
from mpp.data.layout import atomic_write_json, read_manifest, read_tensors, sample_path, write_manifest
from mpp.data.raw import RawSample
from mpp.datamodule import MppDataModule
from mpp.encoders import EncoderSettings
from mpp.prepare import prepare_info, write_sample
from mpp.toy.bundle import toy_encoder_settings
from mpp.toy.prepare import ToyData


def bare_read(root: str, records: list[dict], reader=load_file) -> None:
    for r in records:
        with open(sample_path(root, "caption", r["id"])) as f:
            json.load(f)
        for kind in ("latents", "clip", "dino", "text"):
            reader(sample_path(root, kind, r["id"]))


FLUX_BUCKETS = Buckets(aspect_ratios=[1.0, 16 / 9, 2.39], portrait=False).resolve(1024)


def flux_sized_encoders(root: str) -> EncoderSettings:
    """Config-only encoder folders with FLUX.1-dev's, CLIP-L's and DINOv2-L's widths (no weights:
    the DataModule reads only the configs)."""
    folders = {"flux/text_encoder": CLIPTextConfig(hidden_size=768), "flux/text_encoder_2": T5Config(d_model=4096),
               "clip_vision": CLIPVisionConfig(projection_dim=768), "dino": Dinov2Config(hidden_size=1024)}
    for sub, config in folders.items():
        config.save_pretrained(os.path.join(root, "encoders", sub))
    os.makedirs(os.path.join(root, "encoders", "flux", "vae"), exist_ok=True)
    return EncoderSettings(flux=os.path.join(root, "encoders", "flux"),
                           clip_vision=os.path.join(root, "encoders", "clip_vision"),
                           dino=os.path.join(root, "encoders", "dino"))


def write_flux_sized(root: str, samples: int, encoders: EncoderSettings) -> None:
    """`samples` random samples of FLUX.1's stored shapes, in FLUX_BUCKETS in turn, 1-4 instances each,
    written by preparation's own writer (`mpp.prepare.write_sample`)."""
    if os.path.exists(os.path.join(root, "manifest.jsonl")):
        return
    g = torch.Generator().manual_seed(0)
    records = []
    for i in tqdm(range(samples), desc="writing FLUX-sized samples", unit="sample"):
        (w, h), n = FLUX_BUCKETS[i % len(FLUX_BUCKETS)], 1 + i % 4
        corner = torch.rand(n, 2, generator=g) * 0.5
        boxes = torch.cat([corner, corner + 0.1 + torch.rand(n, 2, generator=g) * 0.4], dim=1)
        sample = RawSample(id=f"{i:08d}", image=torch.zeros(3, h, w), caption="a scene", boxes=boxes,
                           instance_captions=["a thing"] * n, foreground=[k % 2 == 0 for k in range(n)],
                           references=[None] * n, reference_paths=[None] * n, source_size=(w, h), bucket=(w, h))
        tensors = {"latents": {"latents": torch.randn(16, h // 8, w // 8, generator=g)},
                   "clip": {"embeds": torch.randn(n, 768, generator=g)},
                   "dino": {"embeds": torch.randn(n, 1024, generator=g)},
                   "text": {"prompt_embeds": torch.randn(512, 4096, generator=g),
                            "pooled_prompt_embeds": torch.randn(768, generator=g),
                            "instance_embeds": torch.randn(n, 768, generator=g)}}
        records.append(write_sample(root, sample, tensors, torch.bfloat16))
    atomic_write_json(os.path.join(root, "prepare.json"), prepare_info(encoders, 1024, "bfloat16", FLUX_BUCKETS))
    write_manifest(os.path.join(root, "manifest.jsonl"), records)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--flux_sized", action="store_true", help="FLUX.1-sized random samples instead of the toy's")
    p.add_argument("--root", default=None, help="default .cache/bench/toy_data_wide (--flux_sized: "
                   ".cache/bench/flux_sized_data)")
    p.add_argument("--models", default=".cache/bench/toy_models")
    p.add_argument("--samples", type=int, default=None, help="default 512 (--flux_sized: 192)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch_size", type=int, default=None, help="default 8 (--flux_sized: 2)")
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--aspect_ratios", type=float, nargs="+", default=[1.0, 1.7778, 2.39])
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.flux_sized:
        a.root = a.root or ".cache/bench/flux_sized_data"
        a.samples, a.batch_size = a.samples or 192, a.batch_size or 2
        encoders = flux_sized_encoders(a.root)
        write_flux_sized(a.root, a.samples, encoders)
        dm = MppDataModule(a.root, encoders=encoders, resolution=1024, batch_size=a.batch_size,
                           num_workers=a.num_workers, pin_memory=False, val_fraction=0.01)
    else:
        a.root = a.root or ".cache/bench/toy_data_wide"
        a.samples, a.batch_size = a.samples or 512, a.batch_size or 8
        dm = MppDataModule(a.root, encoders=toy_encoder_settings(a.models), resolution=128, batch_size=a.batch_size,
                           num_workers=a.num_workers, pin_memory=False, val_fraction=0.01,
                           toy=ToyData(models_dir=a.models, num_samples=a.samples, image_size=128, pretrain_steps=0,
                                       vision_steps=0, aspect_ratios=a.aspect_ratios))
    dm.prepare_data()
    dm.setup("fit")
    records = read_manifest(os.path.join(a.root, "manifest.jsonl"))
    bare_read(a.root, records[:64])  # warm the page cache for both

    rates = {"datamodule": [], "bare": [], "same_reader": []}
    loader = dm.train_dataloader()  # built once, as Lightning does; its workers persist across epochs
    for epoch in range(a.epochs):  # interleaved, so both see the same machine state
        loader.batch_sampler.set_epoch(epoch)
        start, n = time.perf_counter(), 0
        for batch in loader:
            n += len(dm.on_before_batch_transfer(batch, 0)["ids"])
        rates["datamodule"].append(n / (time.perf_counter() - start))
        start = time.perf_counter()
        bare_read(a.root, dm.train_records)
        rates["bare"].append(len(dm.train_records) / (time.perf_counter() - start))
        start = time.perf_counter()
        bare_read(a.root, dm.train_records, reader=read_tensors)
        rates["same_reader"].append(len(dm.train_records) / (time.perf_counter() - start))
    # epochs are paired (each DataModule epoch with the bare read right after it); medians resist
    # the noise of a shared machine
    ratios = [d / b for d, b in zip(rates["datamodule"], rates["bare"], strict=True)]
    same = [d / b for d, b in zip(rates["datamodule"], rates["same_reader"], strict=True)]
    buckets = sorted({tuple(r["bucket"]) for r in records})
    median = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    print(f"{'loop':<36}{'samples/s':>12}{'DataModule ratio':>18}")
    print(f"{'DataModule (' + str(a.num_workers) + ' workers)':<36}{median['datamodule']:>12}{'':>18}")
    print(f"{'bare read, load_file':<36}{median['bare']:>12}{statistics.median(ratios):>18.3f}")
    print(f"{'bare read, read_tensors':<36}{median['same_reader']:>12}{statistics.median(same):>18.3f}")
    if dm.bad_records:
        raise RuntimeError(f"the DataModule skipped bad records: {dm.bad_records}")
    print(json.dumps({"data": "flux_sized" if a.flux_sized else "toy", "samples": len(records),
                      "buckets": [list(b) for b in buckets], "batch_size": a.batch_size,
                      "num_workers": a.num_workers, "epochs": a.epochs,
                      "datamodule_samples_per_s": median["datamodule"],
                      "bare_read_samples_per_s": median["bare"],
                      "bare_read_same_reader_samples_per_s": median["same_reader"],
                      "ratio_median": round(statistics.median(ratios), 3),
                      "ratio_min": round(min(ratios), 3),
                      "ratio_same_reader_median": round(statistics.median(same), 3)}))


if __name__ == "__main__":
    main()
