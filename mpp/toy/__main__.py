"""``python -m mpp.toy raw ROOT --num N`` writes toy scenes in the raw format;
``python -m mpp.toy models CACHE_DIR [--pretrain-steps N]`` builds (or reuses) the toy model bundle,
with its backbone pretrained on toy scenes for N steps (0: random init)."""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="mpp toy", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    raw = sub.add_parser("raw", help="write toy scenes as a raw dataset")
    raw.add_argument("root")
    raw.add_argument("--num", type=int, default=256)
    raw.add_argument("--start", type=int, default=0)
    raw.add_argument("--seed", type=int, default=0)
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
    models.add_argument("--num-identities", type=int, default=32, help="characters of the world (as configs/toy.yaml)")
    args = parser.parse_args(argv)

    from .scenes import ToyWorld

    start = time.perf_counter()
    if args.cmd == "raw":
        ids = ToyWorld(seed=args.seed).write_raw(args.root, args.num, start=args.start)
        print(f"wrote {len(ids)} scenes to {args.root} in {time.perf_counter() - start:.1f}s")
    else:
        import logging

        from .models import build_toy_models
        from .pretrain import DEFAULT_PRETRAIN_STEPS
        from .vision import VISION_PRETRAIN_STEPS

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        steps = DEFAULT_PRETRAIN_STEPS if args.pretrain_steps is None else args.pretrain_steps
        vision = VISION_PRETRAIN_STEPS if args.vision_steps is None else args.vision_steps
        path = build_toy_models(
            args.cache_dir, world=ToyWorld(seed=args.seed, num_identities=args.num_identities), seed=args.seed,
            fit_samples=args.fit_samples, overwrite=args.overwrite, pretrain_steps=steps, vision_steps=vision,
        )
        print(f"toy models ready at {path} ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main()
