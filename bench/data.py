"""Samples/s of the DataModule (batch 8, 2 workers) versus a bare loop reading the same files.

    python bench/data.py [--root .cache/bench/toy_data_wide] [--samples 512] [--epochs 6]
                         [--aspect_ratios 1 1.7778 2.39]

The toy data comes in square, 16:9 and 2.39:1 frames (three buckets) unless --aspect_ratios 1, so
the DataModule batches within buckets as training does.

Builds the toy dataset on first use. Prints both figures (medians over epochs) and the median of
the paired per-epoch ratios (target: ≥ 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from safetensors.torch import load_file

from mpp.data.layout import read_manifest, sample_path
from mpp.datamodule import MppDataModule
from mpp.toy.bundle import toy_encoder_settings
from mpp.toy.prepare import ToyData


def bare_read(root: str, records: list[dict]) -> None:
    for r in records:
        with open(sample_path(root, "caption", r["id"])) as f:
            json.load(f)
        for kind in ("latents", "clip", "dino", "text"):
            load_file(sample_path(root, kind, r["id"]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default=".cache/bench/toy_data_wide")
    p.add_argument("--models", default=".cache/bench/toy_models")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--aspect_ratios", type=float, nargs="+", default=[1.0, 1.7778, 2.39])
    a = p.parse_args()

    dm = MppDataModule(a.root, encoders=toy_encoder_settings(a.models), resolution=128, batch_size=a.batch_size,
                       num_workers=a.num_workers, pin_memory=False, val_fraction=0.01,
                       toy=ToyData(models_dir=a.models, num_samples=a.samples, image_size=128, pretrain_steps=0,
                                    vision_steps=0, aspect_ratios=a.aspect_ratios))
    dm.prepare_data()
    dm.setup("fit")
    records = read_manifest(os.path.join(a.root, "manifest.jsonl"))
    bare_read(a.root, records[:64])  # warm the page cache for both

    rates = {"datamodule": [], "bare": []}
    loader = dm.train_dataloader()  # built once, as Lightning does; its workers persist across epochs
    for epoch in range(a.epochs):  # interleaved, so both see the same machine state
        loader.batch_sampler.set_epoch(epoch)
        start, n = time.perf_counter(), 0
        for batch in loader:
            n += len(dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)["ids"])
        rates["datamodule"].append(n / (time.perf_counter() - start))
        start = time.perf_counter()
        bare_read(a.root, dm.train_records)
        rates["bare"].append(len(dm.train_records) / (time.perf_counter() - start))
    # epochs are paired (each DataModule epoch with the bare read right after it); medians resist
    # the noise of a shared machine
    ratios = [d / b for d, b in zip(rates["datamodule"], rates["bare"], strict=True)]
    buckets = sorted({tuple(r["bucket"]) for r in records})
    print(json.dumps({"samples": len(records), "buckets": [list(b) for b in buckets], "batch_size": a.batch_size,
                      "num_workers": a.num_workers,
                      "epochs": a.epochs,
                      "datamodule_samples_per_s": round(statistics.median(rates["datamodule"]), 1),
                      "bare_read_samples_per_s": round(statistics.median(rates["bare"]), 1),
                      "ratio_median": round(statistics.median(ratios), 3),
                      "ratio_min": round(min(ratios), 3)}))


if __name__ == "__main__":
    main()
