"""`mpp generate`: a training checkpoint and a layouts JSONL in, PNGs (with and without box
overlays) and a JSON report out.

    mpp generate --config configs/stage1.yaml [--config configs/toy.yaml] \\
        --ckpt_path runs/checkpoints/stage1/step=0000600.ckpt --layouts layouts.jsonl --out generated/ \\
        [--steps 28] [--seed 0] [--model.sampling.layout_guidance 3.0 ...]

or through Lightning, with the same sampling code (``MppModule.predict_step``, ``LayoutWriter``)::

    python main.py predict --config configs/stage1.yaml --ckpt_path ... --data.predict_file layouts.jsonl

Each layout is generated at its own "width" × "height" (pixels, multiples of 16), else the
data.resolution square. The layouts and report formats are `mpp.layouts`'; sampling is
`mpp.sampling`; from what training exported, without Lightning, see `mpp.export.load_exported`. A
bad line is reported with its number and skipped; the good ones are still generated.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from dataclasses import replace

from mpp.checkpoints import load_checkpoint
from mpp.cli import MppCLI
from mpp.datamodule import MppDataModule
from mpp.layouts import read_layouts, write_report
from mpp.lit_module import MppModule
from mpp.sampling import generate

log = logging.getLogger(__name__)


def load_module(configs: list[str], ckpt: str, overrides: list[str] | None = None):
    """Builds the MppModule a config describes and loads a checkpoint's weights into it."""
    args = [a for c in configs for a in ("--config", c)] + list(overrides or [])
    cli = MppCLI(MppModule, MppDataModule, run=False, args=args)
    module = cli.model
    module.configure_model()
    checkpoint = load_checkpoint(ckpt)
    state = checkpoint["state_dict"]
    missing = sorted(module.owned_keys() - set(state))
    if missing:
        raise ValueError(f"{ckpt} lacks {len(missing)} of the model's weights, e.g. {missing[:5]}")
    module.check_shapes(state, checkpoint.get("hyper_parameters"), ckpt)
    module.load_state_dict(state, strict=False)
    return module, cli.datamodule.resolution


def _checkpoint(p: argparse.ArgumentParser, a: argparse.Namespace) -> str:
    """--ckpt_path, or the deprecated --ckpt (its old name), with a warning."""
    if a.ckpt is None:
        if a.ckpt_path is None:
            p.error("the following arguments are required: --ckpt_path")
        return a.ckpt_path
    if a.ckpt_path is not None:
        raise ValueError("--ckpt is the old name of --ckpt_path: give --ckpt_path only")
    warnings.warn("mpp generate: --ckpt is deprecated, use --ckpt_path", FutureWarning, stacklevel=2)
    return a.ckpt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mpp generate", description=__doc__.split("\n")[0],
        epilog="Any other --key=value is a config override passed to the model, e.g. --model.sampling.steps=8, "
               "--model.sampling.layout_guidance=3, --model.sampling.shift=3.0 (see `mpp fit --help`).")
    p.add_argument("--config", action="append", required=True, help="stage config and overlays, in order")
    p.add_argument("--ckpt_path", help="a training checkpoint of that stage")
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--layouts", required=True, help="JSONL of layouts")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: model.sampling.steps)")
    a, overrides = p.parse_known_args(argv)
    ckpt = _checkpoint(p, a)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module, resolution = load_module(a.config, ckpt, overrides)
    layouts, errors = read_layouts(a.layouts, resolution=resolution)
    for e in errors:
        log.error("skipping %s", e)
    sampling = replace(module.sampling, steps=a.steps or module.sampling.steps, seed=a.seed)
    records: list[dict] = []
    try:
        generate(module.model, module.encoders, layouts, a.out, sampling=sampling, guidance=module.hparams.guidance,
                 records=records)
    except BaseException as e:
        errors.append(f"stopped after {len(records)} of {len(layouts)} layouts: {type(e).__name__}: {e}")
        raise
    finally:  # the report lists what was written, whatever happened
        write_report(a.out, records, checkpoint=ckpt, layouts=a.layouts, errors=errors)
    log.info("wrote %d images to %s (%d bad lines skipped)", len(records), a.out, len(errors))
    return 1 if errors else 0  # a bad line or a stopped run: the report says which


if __name__ == "__main__":
    raise SystemExit(main())
