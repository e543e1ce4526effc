"""The LightningCLI of mpp: configs/base.yaml under every stage config, run folders named by the
stage, checkpoints that carry only state."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import time
import warnings
from contextlib import nullcontext

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI

from mpp.callbacks import (
    EMA,
    ExportSafetensors,
    ImageLogger,
    LayoutWriter,
    PreemptionCheckpoint,
    StepProgressBar,
    Throughput,
)
from mpp.checkpoints import load_checkpoint
from mpp.data.workers import end_workers
from mpp.datamodule import MppDataModule
from mpp.lit_module import MppModule
from mpp.run_lock import RunLock
from mpp.stage_end import finish_saved_stage

log = logging.getLogger(__name__)

BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "base.yaml")
RUNS = "runs"
# mpp's callbacks with settings worth tuning, each under its own key of the config
CALLBACK_KEYS = {"checkpoint": ModelCheckpoint, "best_checkpoint": ModelCheckpoint, "images": ImageLogger,
                 "throughput": Throughput, "ema": EMA, "export": ExportSafetensors}
# where a callback whose dirpath is unset writes: runs/<folder>/stage{N}
RUN_FOLDERS = {ModelCheckpoint: "checkpoints", PreemptionCheckpoint: "checkpoints", ExportSafetensors: "export",
               LayoutWriter: "generated"}


def _config_paths(args: list[str]) -> list[tuple[int, str]]:
    """(index of the word that ends it, path) of each `--config PATH` or `--config=PATH` in `args`."""
    found = []
    for i, a in enumerate(args):
        if a.startswith("--config="):
            found.append((i, a.split("=", 1)[1]))
        elif a == "--config" and i + 1 < len(args):
            found.append((i + 1, args[i + 1]))
    return found


def with_stage_overlays(args: list[str], stage: int) -> list[str]:
    """`args` with each `--config X.yaml` followed by `X/stage{stage}.yaml` where that file exists. An
    overlay keeps what it changes in one stage only beside itself (configs/toy/stage2.yaml), so
    `--config configs/toy.yaml` means the same recipe under every stage config: in main.py, train.sh
    and the benches. A companion the arguments already name is not added twice."""
    configs = _config_paths(args)
    named = {os.path.abspath(path) for _, path in configs}
    after = {}
    for end, path in configs:
        companion = os.path.join(os.path.splitext(path)[0], f"stage{stage}.yaml")
        if os.path.isfile(companion) and os.path.abspath(companion) not in named:
            after[end] = companion
            log.info("stage %d: --config %s adds its stage-%d part %s", stage, path, stage, companion)
    out = []
    for i, a in enumerate(args):
        out += [a, "--config", after[i]] if i in after else [a]
    return out


def configure_logging() -> None:
    """mpp's INFO lines (toy build, stage carry-over, export) on stderr, and Lightning's once: its
    package logger prints them itself, and again through a root handler when it propagates."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mpp").setLevel(logging.INFO)
    logging.getLogger("lightning").propagate = False
    # the frozen backbone and encoders are in eval mode on purpose
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def run_folder(kind: str, stage: int) -> str:
    return os.path.join(RUNS, kind, f"stage{stage}")


def _class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _fill_run_folders(cfg: Namespace, stage: int) -> None:
    """Sets each unset `dirpath` of a callback in RUN_FOLDERS to its folder of this stage."""
    listed = cfg.trainer.get("callbacks") or []
    specs = [(_class(c.class_path), c.get("init_args")) for c in (listed if isinstance(listed, list) else [listed])]
    specs += [(cls, cfg.get(key)) for key, cls in CALLBACK_KEYS.items()]
    for cls, args in specs:
        kind = next((k for c, k in RUN_FOLDERS.items() if issubclass(cls, c)), None)
        if kind is not None and args.get("dirpath") is None:
            args.dirpath = run_folder(kind, stage)


class MppCLI(LightningCLI):
    """`configs/base.yaml` is read before any `--config`. `fit --ckpt_path` with a checkpoint of the
    same stage resumes it exactly (same TensorBoard folder); with one of the previous stage it loads
    the weights only and starts this stage fresh. `predict` needs a `--ckpt_path` of the config's
    stage and logs nothing to TensorBoard."""

    def __init__(self, *args, parser_kwargs: dict | None = None, run: bool = True, **kwargs):
        configure_logging()
        if not os.path.isfile(BASE_CONFIG):
            raise FileNotFoundError(f"{BASE_CONFIG} is missing: mpp reads its shared settings from there "
                                    "(install the repository with `pip install -e .`)")
        base = {"default_config_files": [BASE_CONFIG]}
        defaults = {name: dict(base) for name in self.subcommands()} if run else base
        super().__init__(*args, parser_kwargs={**defaults, **(parser_kwargs or {})}, run=run, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.encoders", "model.encoders")
        for key, cls in CALLBACK_KEYS.items():
            parser.add_lightning_class_args(cls, key)

    def parse_arguments(self, parser, args) -> None:
        """Parses `args` (sys.argv when None), then again with the stage parts of its overlays
        (`with_stage_overlays`) where the stage it names has any."""
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
            return
        # Lightning warns when both `args` and sys.argv hold words; `mpp fit ...` passes the same words on
        args = list(sys.argv[1:] if args is None else args)
        # --print_config prints while parsing: the first pass, which only finds the stage, leaves it out
        quiet = [a for a in args if not a.startswith("--print_config")]
        self.config = parser.parse_args(quiet)
        stage = self._config().model.stage
        extended = with_stage_overlays(args, stage)
        if extended != quiet:
            self.config = parser.parse_args(extended)
            if self._config().model.stage != stage:
                raise ValueError(f"an overlay's stage-{stage} part sets model.stage={self._config().model.stage}: "
                                 "configs/<overlay>/stage{N}.yaml may not change the stage")

    def _parse_ckpt_path(self) -> None:
        """LightningCLI would re-apply a checkpoint's hyperparameters over the config; in mpp the
        config of the stage being run is the only source of hyperparameters."""

    def _config(self) -> Namespace:
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def _ckpt_info(self) -> tuple[str | None, dict | None]:
        path = self._config().get("ckpt_path")
        if not path:
            return None, None
        if not os.path.isfile(path):
            raise ValueError(f"--ckpt_path {path} is not a file")
        info = load_checkpoint(path).get("mpp")
        if info is None:
            raise ValueError(f"--ckpt_path {path} is not an mpp checkpoint (no 'mpp' entry)")
        return path, info

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        cfg = self._config()
        stage = cfg.model.stage
        _fill_run_folders(cfg, stage)
        if subcommand == "predict":
            path, info = self._ckpt_info()
            if info is None:
                raise ValueError("predict needs --ckpt_path: a checkpoint of the config's stage")
            if info["stage"] != stage:
                raise ValueError(f"--ckpt_path {path} is a stage-{info['stage']} checkpoint; predict with "
                                 f"configs/stage{info['stage']}.yaml")
            if cfg.return_predictions is None:
                cfg.return_predictions = False  # LayoutWriter saves each image as it comes
            cfg.trainer.logger = False  # nothing to plot: the images and generated.json are the record
            self.save_config_callback = None  # it would write config.yaml to the working directory
            return
        if subcommand is None:
            return
        path, info = self._ckpt_info()
        if subcommand == "fit" and info is not None and info["stage"] not in (stage, stage - 1):
            raise ValueError(f"--ckpt_path {path} is a stage-{info['stage']} checkpoint; stage {stage} "
                             f"resumes from stage {stage} or starts from stage {stage - 1}")
        logger = cfg.trainer.get("logger")
        if logger and not isinstance(logger, (bool, list)) and "version" in logger.get("init_args", {}) \
                and logger.init_args.version is None:
            if subcommand == "fit":  # runs/logs/stage{N}_<timestamp>; the same folder again when resuming
                resumed = info.get("log_version") if info is not None and info["stage"] == stage else None
                logger.init_args.version = resumed or f"stage{stage}_{time.strftime('%Y%m%d-%H%M%S')}"
            else:
                logger.init_args.version = f"stage{stage}_{subcommand}_{time.strftime('%Y%m%d-%H%M%S')}"

    def instantiate_trainer(self, **kwargs):
        trainer = self._get(self.config_init, "trainer", default={})
        listed = trainer.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in listed):
            kwargs.setdefault("callbacks", [*listed, StepProgressBar()])
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        path, info = self._ckpt_info()
        if info is not None and info["stage"] == self.model.stage - 1:
            log.info("stage %d starts from the weights of stage-%d checkpoint %s", self.model.stage, info["stage"],
                     path)
            self.model.init_from = path
            self.config_init["fit"]["ckpt_path"] = None

    def fit(self, **kwargs) -> None:
        """`trainer.fit`, holding the checkpoint folder (`mpp.run_lock`: a second run on it is refused); a
        run that fails before its first optimizer step leaves no log folder behind. A resume from the
        stage's last step finishes the stage instead (`mpp.stage_end`)."""
        log_dir = getattr(self.trainer.logger, "log_dir", None)
        fresh = log_dir is not None and not os.path.exists(log_dir)
        checkpoints = self.trainer.checkpoint_callback
        log.info("stage %d: logs in %s, checkpoints in %s", self.model.stage,
                 log_dir and os.path.abspath(log_dir), checkpoints and checkpoints.dirpath)
        try:
            with RunLock(checkpoints.dirpath, self.trainer.global_rank) if checkpoints else nullcontext():
                if finish_saved_stage(self.trainer, self.model, kwargs.get("ckpt_path")):
                    return
                self.trainer.fit(**kwargs)
        except BaseException:
            ended = end_workers()
            if ended:
                log.info("stopped: ended %d DataLoader workers", len(ended))
            if fresh and self.trainer.global_step == 0 and self.trainer.is_global_zero:
                shutil.rmtree(log_dir, ignore_errors=True)
            raise


def main(args: list[str] | None = None, prog: str | None = None) -> MppCLI:
    """``prog``: the command name `--help` shows (default: the script's)."""
    return MppCLI(MppModule, MppDataModule, args=args, save_config_kwargs={"overwrite": True},
                  parser_kwargs={"prog": prog} if prog else None)
