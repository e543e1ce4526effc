"""The LightningCLI of mpp: stage configs decide everything, checkpoints carry only state."""

from __future__ import annotations

import logging
import os
import time

from lightning.pytorch.cli import LightningCLI

from mpp.checkpoints import load_checkpoint
from mpp.datamodule import MppDataModule
from mpp.lit_module import MppModule

log = logging.getLogger(__name__)


class MppCLI(LightningCLI):
    """`fit --ckpt_path` with a checkpoint of the same stage resumes it exactly (same TensorBoard
    folder); with one of the previous stage it loads the weights only and starts this stage fresh.
    `predict` needs a `--ckpt_path` of the config's stage."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.encoders", "model.encoders")

    def _parse_ckpt_path(self) -> None:
        """LightningCLI would re-apply a checkpoint's hyperparameters over the config; in mpp the
        config of the stage being run is the only source of hyperparameters."""

    def _ckpt_info(self) -> tuple[str | None, dict | None]:
        cfg = self.config.get(self.config.subcommand) if self.config.get("subcommand") else self.config
        path = cfg.get("ckpt_path") if cfg is not None else None
        if not path:
            return None, None
        if not os.path.isfile(path):
            raise ValueError(f"--ckpt_path {path} is not a file")
        info = load_checkpoint(path).get("mpp")
        if info is None:
            raise ValueError(f"--ckpt_path {path} is not an mpp checkpoint (no 'mpp' entry)")
        return path, info

    def before_instantiate_classes(self) -> None:
        if self.config.get("subcommand") == "predict":
            path, info = self._ckpt_info()
            stage = self.config.predict.model.stage
            if info is None:
                raise ValueError("predict needs --ckpt_path: a checkpoint of the config's stage")
            if info["stage"] != stage:
                raise ValueError(f"--ckpt_path {path} is a stage-{info['stage']} checkpoint; predict with "
                                 f"configs/stage{info['stage']}.yaml")
            if self.config.predict.return_predictions is None:
                self.config.predict.return_predictions = False  # LayoutWriter saves each image as it comes
        if self.config.get("subcommand") != "fit":
            return
        cfg = self.config.fit
        stage = cfg.model.stage
        path, info = self._ckpt_info()
        if info is not None and info["stage"] not in (stage, stage - 1):
            raise ValueError(f"--ckpt_path {path} is a stage-{info['stage']} checkpoint; stage {stage} "
                             f"resumes from stage {stage} or starts from stage {stage - 1}")
        logger = cfg.trainer.get("logger")
        if logger and not isinstance(logger, (bool, list)) and "version" in logger.get("init_args", {}) \
                and logger.init_args.version is None:
            resumed = info.get("log_version") if info is not None and info["stage"] == stage else None
            # runs/logs/stage{N}_<timestamp>; the same folder again when resuming
            logger.init_args.version = resumed or f"stage{stage}_{time.strftime('%Y%m%d-%H%M%S')}"

    def before_fit(self) -> None:
        path, info = self._ckpt_info()
        if info is not None and info["stage"] == self.model.stage - 1:
            log.info("stage %d starts from the weights of stage-%d checkpoint %s", self.model.stage, info["stage"],
                     path)
            self.model.init_from = path
            self.config_init["fit"]["ckpt_path"] = None


def main(args: list[str] | None = None) -> MppCLI:
    return MppCLI(MppModule, MppDataModule, args=args, save_config_kwargs={"overwrite": True})
