import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


class StepProgressBar(TQDMProgressBar):
    """One training bar for the whole run, counting optimizer steps toward `trainer.max_steps`
    (Lightning's counts the batches of each epoch, and an open-ended run shows `Epoch 4/-2`);
    `stage N` in front, the loss after it. A resumed run starts the bar at its step. Validation keeps
    Lightning's own bar."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=convert_inf(trainer.estimated_stepping_batches))
        bar.n = bar.initial = trainer.global_step
        bar.set_description(f"stage {getattr(pl_module, 'stage', '')}".strip())

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        pass  # one bar across epochs

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step != self.train_progress_bar.n and self._should_update(step, self.train_progress_bar.total):
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the run folder, logged once when training starts
        return metrics
