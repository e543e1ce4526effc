import logging
import os
import signal

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


class PreemptionCheckpoint(L.Callback):
    """Saves `preempted.ckpt` when the run is told to stop, so `--ckpt_path` picks it up:

    - SIGTERM (Lightning notices it and aborts after the current batch): saved at the end of that batch;
    - SIGUSR1 (a scheduler's advance notice): saved at the next optimizer-step boundary, then the run
      stops cleanly. Under SLURM with auto-requeue, Lightning's own SIGUSR1 handling is left in place.

    Args:
        dirpath: folder of the checkpoint (unset: runs/checkpoints/stage{N}, filled in by mpp's CLI).
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self._notice = False
        self._last_step = -1

    def _on_notice(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing at the next optimizer step", signum)
        self._notice = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        env = trainer._accelerator_connector.cluster_environment
        if stage == "fit" and not (isinstance(env, SLURMEnvironment) and env.auto_requeue):
            signal.signal(signal.SIGUSR1, self._on_notice)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        stepped = trainer.global_step != self._last_step
        self._last_step = trainer.global_step
        if trainer.received_sigterm or (self._notice and stepped):
            path = os.path.join(self.dirpath, "preempted.ckpt")
            trainer.save_checkpoint(path)
            log.warning("saved %s at step %d; stopping", path, trainer.global_step)
            trainer.should_stop = True
            self._notice = False
