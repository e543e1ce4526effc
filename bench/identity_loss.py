"""Cost of the DINO identity loss: a stage-2 training step (forward + backward) with the loss on
every sample versus without it, same batch, interleaved repeats.

    python bench/identity_loss.py [--repeats 10] [--batch_size 8]

Uses the toy world (built on first use under .cache/toy). Prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mpp.cli import MppCLI
from mpp.datamodule import MppDataModule
from mpp.lit_module import MppModule


def step_time(module: MppModule, batch: dict, noise, t) -> float:
    start = time.perf_counter()
    loss = module._losses(batch, noise, t, prefix="")["loss/total"]
    loss.backward()
    module.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=8)
    a = p.parse_args()
    cli = MppCLI(MppModule, MppDataModule, run=False,
                 args=["--config", "configs/stage2.yaml", "--config", "configs/toy.yaml",
                       f"--data.batch_size={a.batch_size}", "--data.num_workers=0"])
    dm, module = cli.datamodule, cli.model
    dm.prepare_data()
    dm.setup("fit")
    module.configure_model()
    batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0), 0)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch["latents"].shape, generator=g)
    t = torch.full((len(batch["ids"]),), 0.3)  # below the threshold: every sample pays for the loss
    times = {"with": [], "without": []}
    weight = module.loss_cfg.dino_identity_weight
    for i in range(a.repeats + 1):
        for name, w in (("with", weight), ("without", 0.0)):
            module.loss_cfg.dino_identity_weight = w
            elapsed = step_time(module, batch, noise, t)
            if i:  # the first round warms up
                times[name].append(elapsed)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"batch_size": a.batch_size, "instances": int(batch["instance_mask"].sum()),
                      "step_ms_with_identity": round(med["with"] * 1e3, 1),
                      "step_ms_without": round(med["without"] * 1e3, 1),
                      "ratio": round(med["with"] / med["without"], 3)}))


if __name__ == "__main__":
    main()
