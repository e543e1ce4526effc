import logging
import os

import lightning as L

from mpp.checkpoints import FINAL, PREEMPTED

log = logging.getLogger(__name__)


def training_finished(trainer: L.Trainer) -> bool:
    """The run reached its configured end (max_steps, else max_epochs), rather than stopping early."""
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return trainer.global_step >= trainer.max_steps
    return trainer.max_epochs is not None and trainer.max_epochs >= 0 and trainer.current_epoch >= trainer.max_epochs


class FinalCheckpoint(L.Callback):
    """When a stage reaches its end, writes `final.ckpt` into the folder of the trainer's checkpoint
    callback: the mark that the stage is finished (the scripts then skip it) and the weights the next
    stage starts from, and removes the folder's `preempted.ckpt`, now stale. A run that stopped early
    (preemption) writes none."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callback = trainer.checkpoint_callback
        if not training_finished(trainer) or callback is None or not callback.dirpath:
            return
        path = os.path.join(callback.dirpath, FINAL)
        trainer.save_checkpoint(path)
        log.info("stage finished at step %d: %s", trainer.global_step, path)
        if trainer.is_global_zero:
            remove_preempted(callback.dirpath)


def remove_preempted(folder: str) -> None:
    """Deletes a finished stage's `preempted.ckpt`: an earlier state of it, never to be resumed."""
    path = os.path.join(folder, PREEMPTED)
    if os.path.isfile(path):
        os.unlink(path)
        log.info("removed %s: the stage finished after it", path)
