"""``mpp <command> ...`` (or ``python -m mpp``): one entry point for every tool.

    mpp fit --config configs/stage1.yaml [--config configs/toy.yaml]   # = python main.py fit ...
    mpp prepare run SOURCE OUTPUT ...                                   # = python -m mpp.prepare
    mpp generate --config ... --ckpt_path ... --layouts layouts.jsonl --out generated/
    mpp evaluate --generated generated/ --layouts layouts.jsonl [--detector toy|grounding-dino|owlv2]
    mpp annotate FRAMES_OR_VIDEOS RAW --cast CAST_DIR                   # footage + cast → raw layout
    mpp synth PROMPTS RAW                                               # FLUX renders, labelled as annotate does
    mpp import coco|layoutsam|yolo SRC RAW                              # the field's formats → raw layout
    mpp studio --config ... --ckpt_path ... [--cast CAST_DIR]           # the layout editor in the browser
    mpp export --config ... --ckpt_path CKPT --out DIR                  # the export of any checkpoint
    mpp launch --standalone --nproc_per_node 8 main.py fit ...          # torchrun, exiting 75 when preempted
    mpp toy models .cache/toy/models
    mpp toy prepare .cache/toy/data --models_dir .cache/toy/models             # the toy dataset
    mpp checkpoints latest runs/checkpoints/stage1                      # the newest loadable checkpoint
    mpp params                                                          # trainable parameters per head
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

TOOLS = {"prepare": "mpp.prepare", "generate": "mpp.generate", "evaluate": "mpp.evaluate", "toy": "mpp.toy.__main__",
         "checkpoints": "mpp.checkpoints", "params": "mpp.nn.params", "annotate": "mpp.annotate.__main__",
         "synth": "mpp.synth", "import": "mpp.importers", "studio": "mpp.studio.__main__",
         "export": "mpp.export_cli", "launch": "mpp.launch"}
TRAINING = ("fit", "validate", "test", "predict")
USER_ERROR_EXIT = 2  # bad input, flag or file: fix it and run again (rerunning unchanged fails the same way)
DEBUG_ENV = "MPP_DEBUG"  # set (to anything) to see the traceback of a user error


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    if command in TOOLS:
        result = importlib.import_module(TOOLS[command]).main(argv[1:])
        return result if isinstance(result, int) else 0
    if command in TRAINING:
        cli = importlib.import_module("mpp.cli")
        preemption = importlib.import_module("mpp.callbacks.preemption")
        return preemption.exit_code(getattr(cli.main(argv, prog="mpp"), "trainer", None))  # 75: preempted, run again
    print(__doc__.strip(), file=sys.stderr)
    return 0 if command in ("-h", "--help") else 2


def run_command(command: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Runs `command` as a process does: a user error (a ValueError naming the flag, file or sample,
    a refused checkpoint, a full disk) ends in one clear block on stderr and exit status USER_ERROR_EXIT, without
    a traceback unless DEBUG_ENV is set; anything else propagates (a bug: its traceback is the report)."""
    refused = importlib.import_module("mpp.checkpoints").NonFiniteError  # lazily, as the commands are
    disk_full = importlib.import_module("mpp.data.layout").DiskFullError
    launched = importlib.import_module("mpp.launch")
    try:
        result = command(argv)
    except (ValueError, FileNotFoundError, refused, disk_full) as e:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"mpp: error: {e}\n(set {DEBUG_ENV}=1 to see where it was raised)", file=sys.stderr)
        launched.write_exit_status(USER_ERROR_EXIT)
        return USER_ERROR_EXIT
    code = result if isinstance(result, int) else 0
    launched.write_exit_status(code)  # for `mpp launch` (torchrun), which would exit 1 on a preemption
    return code


def console() -> int:
    """The `mpp` console script."""
    return run_command(main)


if __name__ == "__main__":
    raise SystemExit(console())
