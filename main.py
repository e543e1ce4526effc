"""python main.py fit --config configs/stage1.yaml [--config configs/toy.yaml] [--ckpt_path CKPT]

Exits 75 when the run was preempted and saved runs/checkpoints/stageN/preempted.ckpt: run it again
(the scripts resume it). See docs/reliability.md.
"""

import sys

from mpp.__main__ import run_command
from mpp.callbacks.preemption import exit_code
from mpp.cli import main


def run(argv: list[str]) -> int:
    return exit_code(getattr(main(argv), "trainer", None))


if __name__ == "__main__":
    sys.exit(run_command(run, sys.argv[1:]))
