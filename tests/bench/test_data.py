"""bench/data.py --flux_sized: its synthetic FLUX.1-sized dataset is one the DataModule accepts."""

from __future__ import annotations

import torch

from mpp.datamodule import MppDataModule
from tests.helpers import load_bench


def test_flux_sized_samples_load_with_flux_shapes_in_their_buckets(tmp_path):
    bench = load_bench("data")
    root = str(tmp_path / "flux")
    encoders = bench.flux_sized_encoders(root)
    bench.write_flux_sized(root, 6, encoders)
    dm = MppDataModule(root, encoders=encoders, resolution=1024, batch_size=1, num_workers=0, pin_memory=False,
                       val_fraction=0.2)
    dm.setup("fit")
    seen = set()
    for batch in dm.train_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)
        assert batch["prompt_embeds"].shape[1:] == (512, 4096) and batch["prompt_embeds"].dtype == torch.bfloat16
        assert batch["dino_embeds"].shape[-1] == 1024 and batch["clip_embeds"].shape[-1] == 768
        h, w = batch["latents"].shape[-2:]
        seen.add((w * 8, h * 8))
    assert not dm.bad_records and seen <= set(bench.FLUX_BUCKETS) and len(seen) > 1
