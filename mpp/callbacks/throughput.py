import time

import lightning as L


class Throughput(L.Callback):
    """Logs `train/samples_per_s` over all ranks, averaged over the last `window` batches."""

    def __init__(self, window: int = 20):
        self.window = window
        self._start: float | None = None
        self._samples = 0
        self._batches = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        if self._start is None:  # the first batch pays for start-up; measure from its end
            self._start = now
            return
        self._samples += len(batch["ids"]) * trainer.world_size
        self._batches += 1
        if self._batches == self.window:
            pl_module.log("train/samples_per_s", self._samples / (now - self._start), on_step=True, on_epoch=False)
            self._start, self._samples, self._batches = now, 0, 0
