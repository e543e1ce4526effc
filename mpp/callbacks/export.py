import json
import logging
import os
from dataclasses import asdict

import lightning as L
from safetensors.torch import save_file

from mpp.callbacks.final import training_finished
from mpp.checkpoints import NonFiniteError, nonfinite_tensors
from mpp.nn.lora import ADAPTER_NAME

log = logging.getLogger(__name__)


class ExportSafetensors(L.Callback):
    """At the end of training, writes the LoRA in diffusers' format (`lora.safetensors`, loadable
    by `FluxPipeline.load_lora_weights`), the heads (`heads.safetensors`) and what it takes to
    rebuild the model without Lightning (`config.json`, read by `mpp.generate.load_exported`) to
    `dirpath`. The weights come from the strategy's full state dict, so under FSDP every rank
    hands its shards to rank 0, which writes the files. A run that stopped before its end
    (preemption) exports nothing: its stage is not final. Non-finite weights are never exported.

    Args:
        dirpath: output folder.
    """

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not training_finished(trainer):
            log.warning("not exporting: training stopped at step %d before its end (max_steps=%d)",
                        trainer.global_step, trainer.max_steps)
            return
        state = trainer.strategy.lightning_module_state_dict()  # collective under FSDP; full on rank 0
        if trainer.is_global_zero:
            export(pl_module, self.dirpath, state)


def export(pl_module, dirpath: str, state: dict) -> None:
    """Writes the export of `pl_module` with the weights of `state`, its full state dict."""
    from diffusers import FluxPipeline

    owned = pl_module.owned_keys()
    bad = list(nonfinite_tensors({k: state[k] for k in owned}))
    if bad:
        raise NonFiniteError(f"refusing to export to {dirpath}: {len(bad)} weights hold non-finite values, e.g. {bad[:5]}")
    os.makedirs(dirpath, exist_ok=True)
    # peft's saved names: relative to the transformer, without the adapter's name
    lora = {k.removeprefix("model.backbone.").replace(f".{ADAPTER_NAME}.", "."): state[k].detach().cpu().contiguous()
            for k in sorted(owned) if ".lora_" in k}
    if lora:
        FluxPipeline.save_lora_weights(dirpath, transformer_lora_layers=lora, weight_name="lora.safetensors")
    heads = {k.removeprefix("model."): state[k].detach().cpu().contiguous() for k in sorted(owned) if ".lora_" not in k}
    save_file(heads, os.path.join(dirpath, "heads.safetensors"), metadata={"stage": str(pl_module.stage)})
    hp = pl_module.hparams
    config = {"stage": pl_module.stage, "backbone": hp.backbone, "backbone_subfolder": hp.backbone_subfolder,
              "backbone_dtype": hp.backbone_dtype, "heads": asdict(pl_module.heads),
              "encoders": pl_module.encoder_settings.to_dict(), "guidance": hp.guidance,
              "sampling": asdict(pl_module.sampling)}
    with open(os.path.join(dirpath, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
