import logging
import os
import signal

import lightning as L

log = logging.getLogger(__name__)


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM or SIGUSR1 (a scheduler's preemption notice), saves `preempted.ckpt` at the next
    optimizer-step boundary and stops the run, so `--ckpt_path` resumes it exactly.

    Args:
        dirpath: folder of the checkpoint.
    """

    def __init__(self, dirpath: str):
        self.dirpath = dirpath
        self._signalled = False
        self._last_step = -1

    def _handler(self, signum, frame) -> None:
        log.warning("received signal %d: checkpointing at the next optimizer step", signum)
        self._signalled = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._handler)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        stepped = trainer.global_step != self._last_step
        self._last_step = trainer.global_step
        if self._signalled and stepped:
            path = os.path.join(self.dirpath, "preempted.ckpt")
            trainer.save_checkpoint(path)
            log.warning("saved %s at step %d; stopping", path, trainer.global_step)
            trainer.should_stop = True
            self._signalled = False
