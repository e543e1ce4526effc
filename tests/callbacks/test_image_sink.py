"""Images and scalars reach any logger: Weights & Biases (offline) and CSV, not only TensorBoard."""

import glob
import os

import wandb

from mpp.cli import main
from tests.helpers import fit_args, write_sample_shots


def test_wandb_offline_run_gets_the_image_grids_and_the_scalars(in_tmp, toy_models, toy_prepared, toy_world,
                                                                monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(in_tmp))
    cli = main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=2",
                  "--trainer.logger=lightning.pytorch.loggers.WandbLogger", "--trainer.logger.offline=true",
                  "--trainer.logger.project=mpp-test", f"--trainer.logger.save_dir={in_tmp}",
                  f"--images.layouts={write_sample_shots(in_tmp, toy_world)}"))
    summary = dict(cli.trainer.logger.experiment.summary)  # the last value of each logged key
    logged = {"loss/total", "loss/flow_matching", "train/grad_norm", "val/loss", "images/truth_vs_generated",
              "layouts/hero", "layouts/wide"}
    assert logged <= set(summary), sorted(summary)
    wandb.finish()
    runs = glob.glob(str(in_tmp / "wandb" / "offline-run-*"))
    assert len(runs) == 1, runs
    # fast.yaml: a grid every 2 steps, so at step 0 (the untrained baseline) and step 2
    grids = glob.glob(os.path.join(runs[0], "files", "media", "images", "images", "truth_vs_generated_*.png"))
    assert len(grids) == 2, grids
    for name in ("hero", "wide"):  # the sample layouts' rows, at the same steps
        assert len(glob.glob(os.path.join(runs[0], "files", "media", "images", "layouts", f"{name}_*.png"))) == 2
    assert not (in_tmp / "runs" / "logs").exists()  # no TensorBoard folder beside it


def test_csv_logger_gets_the_image_grids_as_pngs(in_tmp, toy_models, toy_prepared):
    main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=2",
                  "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={in_tmp}/csv"))
    images = sorted(os.path.basename(p) for p in glob.glob(str(in_tmp / "csv" / "**" / "images" / "*.png"),
                                                           recursive=True))
    assert images == ["images_truth_vs_generated_0000000.png", "images_truth_vs_generated_0000002.png"]
    metrics = glob.glob(str(in_tmp / "csv" / "**" / "metrics.csv"), recursive=True)
    assert metrics and "loss/total" in open(metrics[0]).readline().split(",")
