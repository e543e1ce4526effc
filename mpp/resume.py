"""`python -m mpp.resume STAGE ROOT [FIT ARGUMENTS]`: what a stage script runs, with the stage's own
checkpoints checked against the model its fit arguments configure.

`mpp.checkpoints.plan` alone cannot know that a checkpoint was trained with other `--model.heads`
settings, and would pick it for every rerun, each refused by the fit. Here the fit's arguments
(`--config configs/stageN.yaml ...`, as the script passes them on) configure the model, its weights'
shapes come from a build on the meta device (no weight read), and a checkpoint whose weights differ
is skipped and named. Prints what `mpp.checkpoints plan` prints.
"""

from __future__ import annotations

import logging
import sys

from mpp.checkpoints import print_plan
from mpp.cli import MppCLI
from mpp.datamodule import MppDataModule
from mpp.lit_module import MppModule

log = logging.getLogger(__name__)


def weight_shapes(fit_args: list[str]) -> dict[str, tuple[int, ...]] | None:
    """The shapes of mpp's weights in the model `fit_args` configure; None (warned) when they do not
    resolve (the fit, given them, says why)."""
    try:
        cli = MppCLI(MppModule, MppDataModule, run=False, args=list(fit_args))
        return cli.model.weight_shapes()
    except (ValueError, OSError, SystemExit) as e:
        log.warning("checkpoint shapes not checked: the fit arguments do not resolve (%s)", e)
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m mpp.resume STAGE ROOT [fit arguments]", file=sys.stderr)
        return 2
    stage, root, fit_args = int(argv[0]), argv[1], argv[2:]
    return print_plan(stage, root, weight_shapes(fit_args) if fit_args else None)


if __name__ == "__main__":
    raise SystemExit(main())
