"""python main.py fit --config configs/stage1.yaml [--config configs/toy.yaml] [--ckpt_path CKPT]

Exits 75 when the run was preempted and saved runs/checkpoints/stageN/preempted.ckpt: run it again
(the scripts resume it). See docs/reliability.md.
"""

import sys

from mpp.callbacks.preemption import exit_code
from mpp.cli import main

if __name__ == "__main__":
    cli = main()
    sys.exit(exit_code(getattr(cli, "trainer", None)))
