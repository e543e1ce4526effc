import logging
import os
import re

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from mpp.callbacks.preemption import PreemptionCheckpoint
from mpp.checkpoints import load_checkpoint, remove_temporaries

log = logging.getLogger(__name__)


class CheckpointHousekeeping(L.Callback):
    """At the start of training, makes the checkpoint folders hold what the config promises:

    - deletes the temporaries of checkpoint writes that a kill interrupted;
    - gives each top-k `ModelCheckpoint` the checkpoints of its own on disk (matching its file name,
      written at or before the step this run starts from), keeps the best `save_top_k` of them and
      deletes the rest, so a restarted run rotates out what the runs before it wrote.

    A resumed run does not write its starting step again, and the checkpoint it resumed from rotates
    out like any other (Lightning's ModelCheckpoint never deletes it). Rank 0 decides and deletes; the
    other ranks receive its decision, so every rank agrees on what to save next. Checkpoints written
    after the step the run starts from (a deliberate resume from an older one) are left alone and not
    counted.
    """

    def __init__(self):
        self._resumed: tuple[str, list[ModelCheckpoint]] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callbacks = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        if trainer.ckpt_path and os.path.isfile(trainer.ckpt_path):
            path = os.path.abspath(trainer.ckpt_path)
            owners = [cb for cb in callbacks if cb.monitor is not None and cb.save_top_k > 0
                      and os.path.dirname(path) == os.path.abspath(cb.dirpath)
                      and _file_pattern(cb).fullmatch(os.path.basename(path))]
            self._resumed = (path, owners) if owners else None
        kept = None
        if trainer.is_global_zero:
            folders = {cb.dirpath for cb in callbacks} | {cb.dirpath for cb in trainer.callbacks
                                                          if isinstance(cb, PreemptionCheckpoint)}
            for folder in sorted(f for f in folders if f and os.path.isdir(f)):
                for path in remove_temporaries(folder):
                    log.warning("removed %s, the temporary of an interrupted checkpoint write", path)
            kept = [self._rotate(trainer, cb) for cb in callbacks]
        kept = trainer.strategy.broadcast(kept, src=0)
        for cb, best in zip(callbacks, kept, strict=True):
            # the state this run starts from is on disk already: ModelCheckpoint would save it again at
            # the first batch of a resumed run (it does not keep this in its state), as a "-v1" copy
            cb._last_global_step_saved = trainer.global_step
            if best is not None:
                _set_best(cb, {path: torch.tensor(score) for path, score in best.items()})

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._drop_resumed(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._drop_resumed(trainer)

    def _drop_resumed(self, trainer: L.Trainer) -> None:
        """Deletes the checkpoint this run resumed from once its callbacks' top k no longer hold it."""
        if self._resumed is None:
            return
        path, owners = self._resumed
        if any(path in {os.path.abspath(p) for p in cb.best_k_models} for cb in owners):
            return
        self._resumed = None
        if trainer.is_global_zero and os.path.isfile(path):
            os.unlink(path)
            log.info("removed %s, the checkpoint this run resumed from: rotated out", path)

    @staticmethod
    def _rotate(trainer: L.Trainer, cb: ModelCheckpoint) -> dict[str, float] | None:
        if cb.monitor is None or cb.save_top_k <= 0:
            return None
        pattern = _file_pattern(cb)
        found = {}
        for name in sorted(os.listdir(cb.dirpath)) if os.path.isdir(cb.dirpath) else []:
            path = os.path.join(cb.dirpath, name)
            if not pattern.fullmatch(name) or not os.path.isfile(path):
                continue
            try:
                ckpt = load_checkpoint(path, mmap=True)
                score, step = _score(ckpt, cb), ckpt["global_step"]
            except Exception as e:  # unreadable: not counted, never deleted here
                log.warning("not counting %s toward %s's top %d: %s", path, cb.monitor, cb.save_top_k, e)
                continue
            if score is not None and step <= trainer.global_step:
                found[path] = float(score)
        ranked = sorted(found, key=found.get, reverse=cb.mode == "max")
        keep = {p: found[p] for p in ranked[: cb.save_top_k]}
        for path in ranked[cb.save_top_k:]:
            if trainer.ckpt_path and os.path.abspath(path) == os.path.abspath(trainer.ckpt_path):
                continue  # the checkpoint this run resumed from stays until a later one replaces it
            os.unlink(path)
            log.info("removed %s: beyond %s's top %d by %s", path, type(cb).__name__, cb.save_top_k, cb.monitor)
        return keep


def _score(ckpt: dict, cb: ModelCheckpoint):
    """The value of `cb.monitor` a checkpoint was saved with: its step, or the score its writer recorded
    (a ModelCheckpoint of the same monitor, even one configured otherwise then), or None."""
    if cb.monitor == "step":
        return ckpt["global_step"]
    states = ckpt.get("callbacks", {})
    own = states.get(cb.state_key)
    if own is None:
        own = next((s for s in states.values() if isinstance(s, dict) and s.get("monitor") == cb.monitor
                    and s.get("current_score") is not None), {})
    return own.get("current_score")


def _file_pattern(cb: ModelCheckpoint) -> re.Pattern:
    """The file names `cb` writes: its filename template with any value in each field, an optional
    version suffix, and its extension."""
    template = cb.filename or "{epoch}-{step}"
    parts, last = [], 0
    for m in re.finditer(r"\{([^}:]*)(?::[^}]*)?\}", template):
        parts.append(re.escape(template[last:m.start()]))
        parts.append((re.escape(m.group(1) + "=") if cb.auto_insert_metric_name else "") + ".+?")
        last = m.end()
    parts.append(re.escape(template[last:]))
    return re.compile("".join(parts) + r"(?:-v\d+)?" + re.escape(cb.FILE_EXTENSION))


def _set_best(cb: ModelCheckpoint, best: dict) -> None:
    """What `ModelCheckpoint` tracks of its top k, as if it had saved `best` itself."""
    cb.best_k_models = best
    if not best:
        return
    worst, top = (max, min) if cb.mode == "min" else (min, max)
    if len(best) == cb.save_top_k:
        cb.kth_best_model_path = worst(best, key=best.get)
        cb.kth_value = best[cb.kth_best_model_path]
    cb.best_model_path = top(best, key=best.get)
    cb.best_model_score = best[cb.best_model_path]
