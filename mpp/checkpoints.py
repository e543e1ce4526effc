"""Atomic checkpoint writes, which checkpoint of a stage folder loads, and what a stage script runs.

    python -m mpp.checkpoints latest runs/checkpoints/stage1   # newest loadable checkpoint, exit 1 if none
    python -m mpp.checkpoints final runs/checkpoints/stage1    # the finished stage's final.ckpt, exit 1 if none
    python -m mpp.checkpoints plan 2 runs/checkpoints          # what ./train_stage2.sh does (see `plan`)

"Newest" is the highest training position (optimizer step, then micro-batch) recorded *inside* the
checkpoints directly in the folder — never the modification time, never a copy in a subfolder. A
checkpoint is loadable when it reads, is a training checkpoint, holds every weight it records as
trained, and every weight is finite.
"""

from __future__ import annotations

import glob
import logging
import os
import pickle
import sys
from collections.abc import Iterator
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mpp.data.layout import atomic_write

log = logging.getLogger(__name__)

PREEMPTED = "preempted.ckpt"  # written on a scheduler's notice (mpp.callbacks.preemption); removed at the final
FINAL = "final.ckpt"  # written when a stage reaches its max_steps: the stage is finished
TEMPORARY_PREFIX = ".tmp-"  # mpp.data.layout.atomic_write's temporaries


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight (see docs/reliability.md)."""


def nonfinite_tensors(obj: Any, prefix: str = "") -> Iterator[str]:
    """Names (dotted paths) of the floating-point tensors in a nested dict/list that hold NaN or inf."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            yield prefix or "<tensor>"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from nonfinite_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def _tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in a nested dict/list: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def check_finite(checkpoint: dict, what: str) -> None:
    """Raises NonFiniteError naming the tensors of the weights or optimizer state that are not finite."""
    bad = [*nonfinite_tensors(checkpoint.get("state_dict", {}), "state_dict"),
           *nonfinite_tensors(checkpoint.get("optimizer_states", []), "optimizer_states")]
    if bad:
        raise NonFiniteError(f"refusing to write {what}: {len(bad)} tensors hold non-finite values, e.g. {bad[:5]}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the same folder, fsyncs and renames it, so a
    crash mid-write never leaves a truncated file under a checkpoint's name. A checkpoint whose
    weights or optimizer state are not finite is refused (NonFiniteError), whoever asks for it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        check_finite(checkpoint, str(path))
        if get_filesystem(path).protocol not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path)
        atomic_write(str(path), lambda f: torch.save(checkpoint, f), size_hint=_tensor_bytes(checkpoint))


def load_checkpoint(path: str, *, mmap: bool = False) -> dict:
    """A checkpoint on the CPU; ``mmap`` maps the tensors instead of reading them (cheap key checks).
    A file that exists but is no readable checkpoint (truncated, another format) is a ValueError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise ValueError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                         ) from e


def _unloadable(ckpt: Any, stage: int | None = None, shapes: dict | None = None) -> str | None:
    """Why a loaded checkpoint must not be resumed from (by a run of `stage` whose model's weights have
    `shapes`, when given), or None."""
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return "not a training checkpoint (no state_dict/global_step)"
    info = ckpt.get("mpp")
    if not isinstance(info, dict):
        return "not an mpp checkpoint (no 'mpp' entry)"
    if stage is not None and info.get("stage") != stage:
        return f"a stage-{info.get('stage')} checkpoint, not one of stage {stage}"
    missing = sorted(set(info.get("keys") or ()) - set(ckpt["state_dict"]))
    if missing:
        return f"lacks {len(missing)} of the weights it trained, e.g. {missing[:3]}"
    other = [k for k, v in ckpt["state_dict"].items() if k in (shapes or {}) and tuple(v.shape) != tuple(shapes[k])]
    if other:
        return (f"trained as another model: {len(other)} weights differ in shape from this config's, e.g. "
                f"{other[0]} {tuple(ckpt['state_dict'][other[0]].shape)} there, {tuple(shapes[other[0]])} here")
    bad = [*nonfinite_tensors(ckpt["state_dict"], "state_dict"),
           *nonfinite_tensors(ckpt.get("optimizer_states", []), "optimizer_states")]
    if bad:
        return f"{len(bad)} tensors hold non-finite values, e.g. {bad[:3]}"
    return None


def _read(path: str) -> dict | None:
    try:
        return load_checkpoint(path, mmap=True)
    except Exception as e:  # a truncated or foreign file can fail in many ways
        log.warning("skipping unreadable checkpoint %s: %s", path, e)
        return None


def is_loadable(path: str, stage: int | None = None, shapes: dict | None = None) -> bool:
    """Whether a run (of `stage`, its weights of `shapes`, when given) can resume from the checkpoint at
    `path`; logs why not."""
    ckpt = _read(path)
    if ckpt is None:
        return False
    reason = _unloadable(ckpt, stage, shapes)
    if reason:
        log.warning("skipping %s: %s", path, reason)
    return reason is None


def _outside(path: str, folder: str) -> str | None:
    """Where `path` really is, when a link takes it out of `folder`."""
    real = os.path.realpath(path)
    return real if os.path.dirname(real) != os.path.realpath(folder) else None


def position(ckpt: dict) -> tuple[int, int]:
    """(optimizer steps, micro-batches) a checkpoint has trained: what "newest" orders by."""
    return int(ckpt["global_step"]), int((ckpt.get("mpp") or {}).get("micro_step", 0))


def latest_checkpoint(folder: str, stage: int | None = None, shapes: dict | None = None) -> str | None:
    """The checkpoint directly in `folder` (not its subfolders, nor a link out of it) with the highest
    training position that a run (of `stage`, its weights of `shapes`, when given) can resume from, or
    None. Ties go to the alphabetically last name (all hold the same state). What it skips, it names
    (warnings)."""
    found = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*.ckpt"))):
        if not os.path.isfile(path):
            continue
        if (real := _outside(path, folder)) is not None:
            log.warning("skipping %s: a link to %s, outside %s", path, real, folder)
            continue
        ckpt = _read(path)
        if ckpt is None:
            continue
        if not isinstance(ckpt, dict) or "global_step" not in ckpt:
            log.warning("skipping %s: not a training checkpoint (no state_dict/global_step)", path)
            continue
        found.append((position(ckpt), path))
        del ckpt
    for _, path in sorted(found, reverse=True):
        if is_loadable(path, stage, shapes):
            return path
    return None


def final_checkpoint(folder: str, stage: int | None = None, shapes: dict | None = None) -> str | None:
    """`folder`/final.ckpt when it is loadable (by a run of `stage`, when given): the stage finished."""
    path = os.path.join(folder, FINAL)
    if not os.path.isfile(path):
        return None
    if (real := _outside(path, folder)) is not None:
        log.warning("skipping %s: a link to %s, outside %s", path, real, folder)
        return None
    return path if is_loadable(path, stage, shapes) else None


def plan(stage: int, root: str, shapes: dict | None = None) -> tuple[str, str | None]:
    """What a stage script does with the checkpoints under `root` (root/stage{N}/), its own checked
    against the stage's model's weight `shapes` when given (`mpp.resume`):

    - ("done", final): the stage finished (its final.ckpt loads); nothing to run;
    - ("resume", ckpt): its own newest loadable checkpoint, resumed exactly;
    - ("start", final): the previous stage's final.ckpt, whose weights start this stage;
    - ("fresh", None): stage 1 with nothing to resume.

    Raises ValueError when the previous stage has not finished.
    """
    own = os.path.join(root, f"stage{stage}")
    if (final := final_checkpoint(own, stage, shapes)) is not None:
        return "done", final
    if (latest := latest_checkpoint(own, stage, shapes)) is not None:
        return "resume", latest
    if stage == 1:
        return "fresh", None
    prev = os.path.join(root, f"stage{stage - 1}")
    if (final := final_checkpoint(prev, stage - 1)) is not None:
        return "start", final
    raise ValueError(f"stage {stage - 1} has not finished ({prev} holds no loadable {FINAL}): "
                     f"run ./train_stage{stage - 1}.sh first, or pass a checkpoint to start from")


def remove_temporaries(folder: str) -> list[str]:
    """Deletes the temporaries that killed checkpoint writes left in `folder`; returns their paths.
    Only for folders no other process is writing to (a run's own checkpoint folder, at its start)."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), f"{TEMPORARY_PREFIX}*.ckpt")):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def print_plan(stage: int, root: str, shapes: dict | None = None) -> int:
    """Prints `plan`'s answer as the stage scripts read it ('ACTION [PATH]'); 1 (the reason on stderr)
    when the previous stage has not finished."""
    try:
        action, path = plan(stage, root, shapes)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 1
    print(action if path is None else f"{action} {path}")
    return 0


USAGE = ("usage: python -m mpp.checkpoints latest FOLDER | final FOLDER | plan STAGE ROOT\n"
         "  plan prints 'done PATH', 'resume PATH', 'start PATH' or 'fresh'")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if len(argv) == 2 and argv[0] in ("latest", "final"):
        path = (latest_checkpoint if argv[0] == "latest" else final_checkpoint)(argv[1])
        if path is None:
            print(f"no loadable {'checkpoint' if argv[0] == 'latest' else FINAL} in {argv[1]}", file=sys.stderr)
            return 1
        print(path)
        return 0
    if len(argv) == 3 and argv[0] == "plan" and argv[1].isdigit():
        return print_plan(int(argv[1]), argv[2])
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
