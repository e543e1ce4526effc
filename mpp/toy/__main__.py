"""``python -m mpp.toy raw ROOT --num N [--aspect-ratios 1 1.7778 2.39]`` writes toy scenes in the raw
format (square, or in frames of those aspect ratios);
``python -m mpp.toy models CACHE_DIR [--pretrain-steps N]`` builds (or reuses) the toy model bundle,
with its backbone pretrained on toy scenes for N steps (0: random init); ``--config configs/toy.yaml``
builds the one of that overlay's `data.toy` world and budgets (``--overwrite``: trained here, not
copied from the shipped bundle);
``python -m mpp.toy ship CACHE_DIR`` makes a built bundle the one that ships with mpp (`mpp.toy.shipped`);
``python -m mpp.toy prepare OUT --models_dir DIR [--num_samples N ...]`` builds the bundle and a
prepared toy dataset (`mpp.toy.prepare.prepare_toy`; ``prepare --help`` lists its options)."""

from __future__ import annotations

import argparse
import logging
import sys
import time

import yaml
from jsonargparse import auto_cli

from .models import build_toy_models
from .prepare import ToyData, prepare_toy
from .pretrain import DEFAULT_PRETRAIN_STEPS
from .scenes import ToyWorld, frames_for
from .shipped import ship_bundle
from .vision import VISION_PRETRAIN_STEPS


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prepare"]:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        auto_cli(prepare_toy, args=argv[1:])
        return
    parser = argparse.ArgumentParser(prog="mpp toy", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    raw = sub.add_parser("raw", help="write toy scenes as a raw dataset")
    raw.add_argument("root")
    raw.add_argument("--num", type=int, default=256)
    raw.add_argument("--start", type=int, default=0)
    raw.add_argument("--seed", type=int, default=0)
    raw.add_argument("--aspect-ratios", type=float, nargs="+", default=None,
                     help="frames of these aspect ratios (width / height), one per scene (default: square)")
    models = sub.add_parser("models", help="build the toy model bundle")
    models.add_argument("cache_dir")
    models.add_argument("--seed", type=int, default=0)
    models.add_argument("--fit-samples", type=int, default=256)
    models.add_argument("--overwrite", action="store_true")
    models.add_argument("--pretrain-steps", type=int, default=None,
                        help="text-to-image pretraining steps of the toy backbone "
                             "(default: mpp.toy.pretrain.DEFAULT_PRETRAIN_STEPS; 0 keeps it random)")
    models.add_argument("--vision-steps", type=int, default=None,
                        help="pretraining steps of the toy CLIP vision and DINOv2 encoders "
                             "(default: mpp.toy.vision.VISION_PRETRAIN_STEPS; 0 keeps them random)")
    models.add_argument("--num-identities", type=int, default=32, help="characters of the world")
    models.add_argument("--config", default=None,
                        help="an overlay (configs/toy.yaml) whose data.toy world and budgets to build; "
                             "instead of --seed, --num-identities and the step flags")
    ship = sub.add_parser("ship", help="make a built bundle the one that ships with mpp (mpp/toy/pretrained)")
    ship.add_argument("cache_dir")
    ship.add_argument("--note", default="", help="where and how it was built, kept in the manifest")
    sub.add_parser("prepare", help="build the bundle and a prepared toy dataset (prepare --help)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.cmd == "raw":
        frames = None if args.aspect_ratios is None else frames_for(128, args.aspect_ratios)
        ids = ToyWorld(seed=args.seed, frames=frames).write_raw(args.root, args.num, start=args.start)
        print(f"wrote {len(ids)} scenes to {args.root} in {time.perf_counter() - start:.1f}s")
    elif args.cmd == "ship":
        print(f"shipped bundle: {ship_bundle(args.cache_dir, note=args.note)}")
    else:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        steps = DEFAULT_PRETRAIN_STEPS if args.pretrain_steps is None else args.pretrain_steps
        vision = VISION_PRETRAIN_STEPS if args.vision_steps is None else args.vision_steps
        world = ToyWorld(seed=args.seed, num_identities=args.num_identities)
        seed = args.seed
        if args.config:
            toy = overlay_toy_data(args.config)
            world, seed, steps, vision = toy.bundle_world(), toy.seed, toy.pretrain_steps, toy.vision_steps
        path = build_toy_models(args.cache_dir, world=world, seed=seed, fit_samples=args.fit_samples,
                                overwrite=args.overwrite, pretrain_steps=steps, vision_steps=vision)
        print(f"toy models ready at {path} ({time.perf_counter() - start:.1f}s)")


def overlay_toy_data(path: str) -> ToyData:
    """The `data.toy` settings of the overlay at `path` (configs/toy.yaml), as the DataModule takes them."""
    try:
        with open(path, encoding="utf-8") as f:
            toy = ((yaml.safe_load(f) or {}).get("data") or {}).get("toy")
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--config {path}: cannot read it ({e})") from e
    if not toy:
        raise ValueError(f"--config {path}: sets no data.toy")
    return ToyData(**toy)


if __name__ == "__main__":
    main()
