import logging
import os

import lightning as L

from mpp.callbacks.ema import averaged
from mpp.callbacks.final import training_finished
from mpp.checkpoints import NonFiniteError, nonfinite_tensors
from mpp.export import ExportConfig, check_kohya, write_export
from mpp.nn.lora import lora_metadata

log = logging.getLogger(__name__)


class ExportSafetensors(L.Callback):
    """At the end of training, writes the export (`mpp.export`: the LoRA in diffusers' format, the
    heads and what it takes to rebuild the model without Lightning, read by
    `mpp.export.load_exported`) to `dirpath`. The weights come from the strategy's full state dict,
    so under FSDP every rank hands its shards to rank 0, which writes the files. A run that stopped
    before its end (preemption) exports nothing: its stage is not final. Non-finite weights are
    never exported.

    Args:
        dirpath: output folder (unset: runs/export/stage{N}, filled in by mpp's CLI).
        kohya: also write the LoRA in the kohya format (`lora_kohya.safetensors`; a model with
            `heads.lora_scope: all` only, checked when the run starts).
    """

    def __init__(self, dirpath: str | None = None, kohya: bool = False):
        self.dirpath = dirpath
        self.kohya = kohya

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_kohya(self.kohya, pl_module.heads.lora_scope, "--export.kohya")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not training_finished(trainer):
            log.warning("not exporting: training stopped at step %d before its end (max_steps=%d)",
                        trainer.global_step, trainer.max_steps)
            return
        if trainer.is_global_zero:
            log.info("exporting the stage-%d weights to %s", pl_module.stage, self.dirpath)
        with averaged(trainer, pl_module):  # the EMA's weights where the run keeps one
            state = trainer.strategy.lightning_module_state_dict()  # collective under FSDP; full on rank 0
            # copied while the average is in: a state dict's tensors share the parameters' storage
            state = {k: state[k].detach().clone() for k in pl_module.owned_keys() if k in state}
        if not trainer.is_global_zero:
            return
        export_module(pl_module, state, self.dirpath, kohya=self.kohya)


def export_module(pl_module: L.LightningModule, state: dict, dirpath: str, *, kohya: bool = False) -> None:
    """Writes the export of `pl_module` (an MppModule) whose full state dict is `state` to `dirpath`;
    the callback's and `mpp export`'s one path. Non-finite weights are never exported."""
    weights = {k.removeprefix("model."): state[k] for k in pl_module.owned_keys()}  # MppFlux's names
    bad = list(nonfinite_tensors(weights))
    if bad:
        raise NonFiniteError(f"refusing to export to {dirpath}: {len(bad)} weights hold non-finite values, "
                             f"e.g. {bad[:5]}")
    hp = pl_module.hparams
    config = ExportConfig(stage=pl_module.stage, backbone=hp.backbone, backbone_subfolder=hp.backbone_subfolder,
                          backbone_dtype=hp.backbone_dtype, heads=pl_module.heads,
                          encoders=pl_module.encoder_settings, guidance=hp.guidance, sampling=pl_module.sampling)
    write_export(dirpath, weights, config, lora_metadata(pl_module.model.backbone), kohya=kohya)
    log.info("exported %s to %s", ", ".join(sorted(os.listdir(dirpath))), dirpath)
