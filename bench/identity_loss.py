"""Cost of the DINO identity loss: a stage-2 training step (forward + backward) without the identity
term, with it on the flow batch's own samples (`dino_own_timesteps=false`, every sample forced below
the threshold: the most that mode ever pays), and with its own low-t forward (the default), same
batch, interleaved repeats.

    python bench/identity_loss.py [--repeats 10] [--batch_size 8] [--dino_samples 2]

Uses the toy world (built on first use under .cache/toy). Prints a table and one JSON line: the
medians and their ratios to the step without the term.
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

MODES = {"without": dict(dino_identity_weight=0.0),
         "shared_t": dict(dino_own_timesteps=False),
         "own_t": dict(dino_own_timesteps=True)}


def step_time(module: MppModule, batch: dict, noise, t) -> float:
    start = time.perf_counter()
    loss = module._losses(batch, noise, t, prefix="", g=torch.Generator().manual_seed(0))["loss/total"]
    loss.backward()
    module.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--dino_samples", type=int, default=2)
    a = p.parse_args()
    cli = MppCLI(MppModule, MppDataModule, run=False,
                 args=["--config", "configs/stage2.yaml", "--config", "configs/toy.yaml",
                       f"--data.batch_size={a.batch_size}", "--data.num_workers=0",
                       f"--model.loss.dino_samples={a.dino_samples}"])
    dm, module = cli.datamodule, cli.model
    dm.prepare_data()
    dm.setup("fit")
    module.configure_model()
    batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0), 0)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch["latents"].shape, generator=g)
    t = torch.full((len(batch["ids"]),), 0.3)  # below the threshold: shared_t pays for every sample
    cfg = module.loss_cfg
    base = {k: getattr(cfg, k) for k in ("dino_identity_weight", "dino_own_timesteps")}
    times = {name: [] for name in MODES}
    for i in range(a.repeats + 1):
        for name, change in MODES.items():
            for k, v in {**base, **change}.items():
                setattr(cfg, k, v)
            elapsed = step_time(module, batch, noise, t)
            if i:  # the first round warms up
                times[name].append(elapsed)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'mode':<10}{'ms/step':>10}{'ratio':>8}")
    for name, m in med.items():
        print(f"{name:<10}{m * 1e3:>10.1f}{m / med['without']:>8.2f}")
    print(json.dumps({"batch_size": a.batch_size, "dino_samples": a.dino_samples,
                      "instances": int(batch["instance_mask"].sum()),
                      **{f"step_ms_{k}": round(v * 1e3, 1) for k, v in med.items()},
                      **{f"ratio_{k}": round(v / med["without"], 3) for k, v in med.items() if k != "without"}}))


if __name__ == "__main__":
    main()
