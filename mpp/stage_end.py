"""A stage resumed from a checkpoint of its own last step: what the end of training would have left.

Lightning resumes such a checkpoint by doing nothing ("`max_steps` reached"), without the end-of-training
hooks, so a run killed between its last periodic checkpoint and `final.ckpt` would leave a stage that
no rerun finishes (the scripts would never reach the next stage). `finish_saved_stage` writes what
those hooks write, from the checkpoint: `final.ckpt` (the checkpoint itself, copied atomically) and the
export (its weights, or its EMA where the run keeps one).
"""

from __future__ import annotations

import logging
import os
import shutil

import lightning as L

from mpp.callbacks.ema import EMA, ema_weights
from mpp.callbacks.export import ExportSafetensors, export_module
from mpp.callbacks.final import remove_preempted
from mpp.checkpoints import FINAL, load_checkpoint
from mpp.data.layout import atomic_write

log = logging.getLogger(__name__)


def finish_saved_stage(trainer: L.Trainer, module: L.LightningModule, ckpt_path: str | None) -> bool:
    """When `ckpt_path` (the fit's resume checkpoint) is at the run's `max_steps`, writes `final.ckpt`
    and the export on rank 0 as the end of training does, and returns True: nothing is left to train."""
    if not ckpt_path or trainer.max_steps is None or trainer.max_steps <= 0:
        return False
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("global_step", 0) < trainer.max_steps:
        return False
    folder = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None
    log.info("%s is at step %d, this stage's max_steps=%d: finishing the stage from it", ckpt_path,
             ckpt["global_step"], trainer.max_steps)
    if not trainer.is_global_zero:
        return True
    if folder:
        final = os.path.join(folder, FINAL)
        if os.path.abspath(final) != os.path.abspath(ckpt_path):
            with open(ckpt_path, "rb") as src:
                atomic_write(final, lambda f: shutil.copyfileobj(src, f, 1 << 24))
            log.info("stage finished at step %d: %s", ckpt["global_step"], final)
        remove_preempted(folder)
    exports = [c for c in trainer.callbacks if isinstance(c, ExportSafetensors)]
    if not exports:
        return True
    module.configure_model()  # the weights as `mpp export` loads them
    module.check_shapes(ckpt["state_dict"], ckpt.get("hyper_parameters"), ckpt_path)
    module.load_state_dict(ckpt["state_dict"], strict=False)
    state = module.state_dict()
    if any(isinstance(c, EMA) and c.enabled for c in trainer.callbacks):
        state.update({k: v.to(state[k].dtype) for k, v in ema_weights(ckpt, ckpt_path).items()})
    for export in exports:
        export_module(module, state, export.dirpath, kohya=export.kohya)
    return True
