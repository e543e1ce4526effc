"""`mpp export`: the export of any training checkpoint (a mid-run one, the best, the final), the
same files the end of a stage writes (`mpp.export`).

    mpp export --config configs/stage1.yaml [--config configs/toy.yaml] \\
        --ckpt_path runs/checkpoints/stage1/step=0000300.ckpt --out exports/step300 [--ema] [--kohya] \\
        [--model.… overrides]

`--ema`: the checkpoint's exponential moving average (`mpp.callbacks.ema`, a run with `ema.enabled`)
instead of its weights. `--kohya`: also the LoRA in the kohya format (`lora_kohya.safetensors`, for a
model trained with `heads.lora_scope: all`).
"""

from __future__ import annotations

import argparse
import logging
import os

from mpp.callbacks.ema import ema_weights
from mpp.callbacks.export import export_module
from mpp.checkpoints import load_checkpoint
from mpp.export import check_kohya
from mpp.generate import load_module

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mpp export", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", required=True, help="the checkpoint's stage config and overlays")
    p.add_argument("--ckpt_path", required=True, help="a training checkpoint of that stage")
    p.add_argument("--out", required=True, help="the export folder (must not hold an export already)")
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    p.add_argument("--kohya", action="store_true", help="also write the LoRA in the kohya format (lora_scope: all)")
    a, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not os.path.isfile(a.ckpt_path):
        raise ValueError(f"--ckpt_path {a.ckpt_path!r} is not a file")
    if os.path.exists(os.path.join(a.out, "config.json")):
        raise ValueError(f"--out {a.out!r} already holds an export: give another folder or delete it")
    log.info("export: loading %s", a.ckpt_path)
    module, _ = load_module(a.config, a.ckpt_path, overrides)
    check_kohya(a.kohya, module.heads.lora_scope, "--kohya")
    state = module.state_dict()
    if a.ema:
        shadow = ema_weights(load_checkpoint(a.ckpt_path), a.ckpt_path)
        unknown = sorted(set(shadow) - set(state))
        if unknown:
            raise ValueError(f"--ema: {a.ckpt_path}'s EMA holds weights this model lacks, e.g. {unknown[:3]}")
        state = {**state, **{k: v.to(state[k].dtype) for k, v in shadow.items()}}
    export_module(module, state, a.out, kohya=a.kohya)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
