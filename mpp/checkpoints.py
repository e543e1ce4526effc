"""Atomic checkpoint writes and finding the newest checkpoint that loads.

    python -m mpp.checkpoints latest runs/checkpoints/stage1    # prints the path, exit 1 if none
"""

from __future__ import annotations

import glob
import logging
import os
import sys
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mpp.data.layout import atomic_write

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the same folder, fsyncs and renames it, so a
    crash mid-write never leaves a truncated file under a checkpoint's name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if get_filesystem(path).protocol not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path)
        atomic_write(str(path), lambda f: torch.save(checkpoint, f))


def load_checkpoint(path: str, *, mmap: bool = False) -> dict:
    """A checkpoint on the CPU; ``mmap`` maps the tensors instead of reading them (cheap key checks)."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def is_loadable(path: str) -> bool:
    try:
        ckpt = load_checkpoint(path)
    except Exception as e:  # a truncated or foreign file can fail in many ways
        log.warning("skipping unreadable checkpoint %s: %s", path, e)
        return False
    if "state_dict" not in ckpt or "global_step" not in ckpt:
        log.warning("skipping %s: not a training checkpoint (no state_dict/global_step)", path)
        return False
    return True


def latest_checkpoint(folder: str) -> str | None:
    """The newest (by modification time) checkpoint under `folder` that loads, or None."""
    paths = sorted(glob.glob(os.path.join(folder, "**", "*.ckpt"), recursive=True), key=os.path.getmtime, reverse=True)
    return next((p for p in paths if is_loadable(p)), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "latest":
        print("usage: python -m mpp.checkpoints latest FOLDER", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    path = latest_checkpoint(argv[1])
    if path is None:
        print(f"no loadable checkpoint under {argv[1]}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
