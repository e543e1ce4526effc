import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from mpp.layouts import save_generated, write_report


class LayoutWriter(BasePredictionWriter):
    """Writes what `predict` generates: `<name>.png`, `<name>_boxes.png` (boxes coloured by α; `name` is
    the layout id as a safe file name) and, at the end, `generated.json` (one record per image, the
    checkpoint, the layouts file and its bad lines) to `dirpath`.

    Args:
        dirpath: output folder (unset: runs/generated/stage{N}, filled in by mpp's CLI).
    """

    def __init__(self, dirpath: str | None = None):
        super().__init__(write_interval="batch")
        self.dirpath = dirpath
        self.records: list[dict] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.records = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        self.records.append(save_generated(prediction["pixels"], prediction["alpha"], prediction["layout"],
                                           prediction["seed"], self.dirpath))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = trainer.datamodule
        write_report(self.dirpath, self.records, checkpoint=trainer.ckpt_path, layouts=data.predict_file,
                     errors=data.predict_errors)
