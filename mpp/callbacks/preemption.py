import logging
import os
import signal

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from mpp.checkpoints import PREEMPTED

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "preempted, checkpoint saved: run me again" (main.py, the scripts)


class PreemptionCheckpoint(L.Callback):
    """Saves `preempted.ckpt` when a scheduler says the run must stop, so that a rerun resumes it exactly:

    - SIGTERM or SIGUSR1, to any one process or to the whole process group (DataLoader workers
      ignore both: `mpp.data.workers`), sets a notice;
    - at the next optimizer-step boundary (never mid-accumulation), or at the end of a validation
      that was running, every rank learns of any rank's notice (one all-reduce of a flag), the
      checkpoint is saved and the run stops cleanly; `main.py` then exits with PREEMPTED_EXIT (75)
      on rank 0, and the stage is neither finished (no final.ckpt) nor exported.

    The scheduler's grace period must cover one optimizer step plus, at worst, one validation.
    Under SLURM with auto-requeue, Lightning's own signal handling is left in place.

    Args:
        dirpath: folder of the checkpoint (unset: runs/checkpoints/stage{N}, filled in by mpp's CLI).
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.preempted = False  # a preemption checkpoint was saved and the run stopped for it
        self._notice = False
        self._last_step = -1
        self._active = False

    def _on_notice(self, signum, frame) -> None:
        if not self._notice:
            log.warning("received signal %d: checkpointing at the next optimizer step", signum)
        self._notice = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        env = trainer._accelerator_connector.cluster_environment
        self._active = stage == "fit" and not (isinstance(env, SLURMEnvironment) and env.auto_requeue)
        if self._active:
            signal.signal(signal.SIGUSR1, self._on_notice)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        if not self._active:
            return
        # Lightning's SIGTERM handler (installed after setup, restored at teardown) would stop the run
        # after the current micro-batch, mid-accumulation; this one waits for the step to complete
        connector = trainer._signal_connector
        if connector.received_sigterm:  # a SIGTERM before training started: ours to handle now
            connector.received_sigterm, self._notice = False, True
        signal.signal(signal.SIGTERM, self._on_notice)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        stepped = trainer.global_step != self._last_step
        self._last_step = trainer.global_step
        if stepped:
            self._maybe_stop(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._maybe_stop(trainer, pl_module)

    def _maybe_stop(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active or trainer.should_stop:
            return
        flag = torch.tensor(float(self._notice), device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if not bool(flag):
            return
        path = os.path.join(self.dirpath, PREEMPTED)
        trainer.save_checkpoint(path)
        log.warning("saved %s at step %d; stopping (exit %d: run again to resume)", path, trainer.global_step,
                    PREEMPTED_EXIT)
        trainer.should_stop = True
        # Lightning validates a run that stops early (for early stopping): a preempted one leaves within
        # its grace period, and ranks nothing after its checkpoint
        trainer.limit_val_batches = 0
        self.preempted = True
        self._notice = False


def exit_code(trainer: L.Trainer | None) -> int:
    """What `main.py fit` exits with: PREEMPTED_EXIT on rank 0 when the run stopped for a preemption
    (the other ranks exit 0, so a launcher watching them does not kill rank 0 first), else 0."""
    if trainer is None or not trainer.is_global_zero:
        return 0
    preempted = any(isinstance(cb, PreemptionCheckpoint) and cb.preempted for cb in trainer.callbacks)
    return PREEMPTED_EXIT if preempted else 0
