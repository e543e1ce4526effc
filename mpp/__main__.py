"""``mpp <command> ...`` (or ``python -m mpp``): one entry point for every tool.

    mpp fit --config configs/stage1.yaml [--config configs/toy.yaml]   # = python main.py fit ...
    mpp prepare run SOURCE OUTPUT ...                                   # = python -m mpp.prepare
    mpp generate --config ... --ckpt ... --layouts layouts.jsonl --out generated/
    mpp evaluate --generated generated/ --layouts layouts.jsonl
    mpp toy models .cache/toy/models
"""

from __future__ import annotations

import importlib
import sys

TOOLS = {"prepare": "mpp.prepare", "generate": "mpp.generate", "evaluate": "mpp.evaluate", "toy": "mpp.toy.__main__"}
TRAINING = ("fit", "validate", "test", "predict")


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    if command in TOOLS:
        return importlib.import_module(TOOLS[command]).main(argv[1:])
    if command in TRAINING:
        from mpp.callbacks.preemption import exit_code
        from mpp.cli import main as cli_main

        return exit_code(getattr(cli_main(argv), "trainer", None))  # 75: preempted, run again
    print(__doc__.strip(), file=sys.stderr)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    raise SystemExit(main())
