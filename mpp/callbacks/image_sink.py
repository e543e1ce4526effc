"""Images to whichever loggers a run has: the image callbacks' one way out.

TensorBoard takes them through `add_image`; a logger with its own `log_image` (Weights & Biases,
Neptune) through that; any other (CSV) gets PNGs under its log folder, `images/<tag>_<step>.png`.
"""

from __future__ import annotations

import os

import lightning as L
import numpy as np
from PIL import Image
from lightning.pytorch.loggers import TensorBoardLogger

from mpp.viz import to_chw


def log_image(trainer: L.Trainer, tag: str, image: np.ndarray, step: int) -> None:
    """Logs the H×W×3 uint8 `image` as `tag` at `step` to every logger of `trainer`."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, to_chw(image), step)
        elif callable(getattr(logger, "log_image", None)):
            logger.log_image(key=tag, images=[image], step=step)
        elif getattr(logger, "log_dir", None):
            folder = os.path.join(logger.log_dir, "images")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image).save(os.path.join(folder, f"{tag.replace('/', '_')}_{step:07d}.png"))
