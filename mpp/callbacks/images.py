import os
from dataclasses import replace

import lightning as L
import numpy as np
import torch
from PIL import Image
from lightning.pytorch.strategies import FSDPStrategy

from mpp.callbacks.ema import averaged
from mpp.callbacks.image_sink import log_image
from mpp.data.dataset import BadRecord, collate
from mpp.layouts import read_layouts
from mpp.sampling import generate_one
from mpp.viz import draw_boxes, grid, to_uint8


class ImageLogger(L.Callback):
    """Every `every_n_steps` optimizer steps, logs to the run's loggers (`image_sink`) a grid of the first `num_samples`
    validation layouts: ground truth with boxes coloured by α (red foreground, blue background)
    above the model's own Euler-sampled generations of the same layouts from a fixed seed. Layouts
    of different aspect-ratio buckets are sampled bucket by bucket and sit centred in the grid's cells.

    With `layouts` (a layouts JSONL, the format of `mpp generate`, references included), each of its
    layouts is also rendered at those steps from `seeds` fixed seeds (its own seed, else 0, 1, ...)
    and logged as `layouts/<name>`, one row of α-coloured generations, and written as PNGs to
    `<log dir>/samples/step=NNNNNNN/<name>_seed<S>.png` — the user's own shots, watched as it trains.
    A bad line of the file stops the run at its start, naming the file and line.

    Runs under no_grad on rank 0 (on every rank under FSDP, whose forward needs all of them, logging
    on rank 0), restores train mode and leaves the training RNG untouched.

    Args:
        every_n_steps: optimizer steps between grids.
        num_samples: layouts in the grid.
        steps: Euler steps per generation (None: the module's sampling.steps).
        layouts: a layouts JSONL to render as well (None: the validation grid only).
        seeds: generations of each of `layouts`.
    """

    def __init__(self, every_n_steps: int = 500, num_samples: int = 4, steps: int | None = None,
                 layouts: str | None = None, seeds: int = 2):
        if seeds < 1:
            raise ValueError(f"--images.seeds must be >= 1, got {seeds}")
        self.every_n_steps, self.num_samples, self.steps = every_n_steps, num_samples, steps
        self.layouts, self.seeds = layouts, seeds
        self._shots: list = []
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.layouts:
            return
        if not os.path.isfile(self.layouts):
            raise ValueError(f"--images.layouts {self.layouts!r} is not a file")
        self._shots, errors = read_layouts(self.layouts, resolution=trainer.datamodule.resolution)
        if errors:
            raise ValueError(f"--images.layouts: {len(errors)} bad lines, e.g. {errors[0]}")

    def _render_layouts(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[tuple[str, list]]:
        """(name, the α-coloured generations of each seed) of each of `layouts`."""
        out = []
        sampling = pl_module.sampling if self.steps is None else replace(pl_module.sampling, steps=self.steps)
        for layout in self._shots:
            row = []
            for k in range(self.seeds):
                seeded = replace(layout, seed=(layout.seed if layout.seed is not None else 0) + k)
                pixels, alpha, seed = generate_one(pl_module.model, pl_module.encoders, seeded, sampling=sampling,
                                                   index=0, guidance=pl_module.hparams.guidance)
                row.append((seed, pixels, draw_boxes(pixels, seeded.boxes.cpu(), alpha)))
            out.append((layout.name, row))
        return out

    def _batches(self, trainer: L.Trainer, device: torch.device) -> list[dict]:
        """The first `num_samples` good validation samples as batches of one latent size each."""
        dataset = trainer.datamodule.val_dataloader().dataset
        items = [dataset[i] for i in range(min(self.num_samples, len(dataset)))]
        groups: dict[tuple, list[dict]] = {}
        for x in items:
            if not isinstance(x, BadRecord):
                groups.setdefault(tuple(x["latents"].shape), []).append(x)
        batches = []
        for group in groups.values():
            batch = collate(group)
            batch.pop("bad")
            batches.append({k: v.to(device).float() if isinstance(v, torch.Tensor) and v.is_floating_point() else
                            v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return batches

    @torch.no_grad()
    def log_images(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = [[], []]
        with averaged(trainer, pl_module):
            for batch in self._batches(trainer, pl_module.device):
                truth, generated = self._sample(trainer, pl_module, batch)
                rows[0] += truth
                rows[1] += generated
            shots = self._with_train_state(trainer, pl_module, self._render_layouts) if self._shots else []
        if not trainer.is_global_zero:
            return
        if rows[0]:
            log_image(trainer, "images/truth_vs_generated", grid(rows), trainer.global_step)
        # the logger's folder, not trainer.log_dir: that broadcasts, and only rank 0 is here under DDP
        log_dir = getattr(trainer.logger, "log_dir", None) or trainer.default_root_dir
        folder = os.path.join(log_dir, "samples", f"step={trainer.global_step:07d}")
        for name, row in shots:
            log_image(trainer, f"layouts/{name}", grid([[boxed for _, _, boxed in row]]), trainer.global_step)
            os.makedirs(folder, exist_ok=True)
            for seed, pixels, _ in row:
                Image.fromarray(pixels).save(os.path.join(folder, f"{name}_seed{seed}.png"))

    @staticmethod
    def _with_train_state(trainer: L.Trainer, pl_module: L.LightningModule, render):
        """`render(trainer, pl_module)` in eval mode and the training precision, train mode and the
        training RNG restored after."""
        was_training = pl_module.training
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), trainer.precision_plugin.forward_context():
                return render(trainer, pl_module)
        finally:
            pl_module.train(was_training)

    def _sample(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict
                ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The ground truth and the generations of one batch, with boxes coloured by α."""
        was_training = pl_module.training
        pl_module.eval()
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        try:
            # the training step's precision context: under FSDP mixed precision the blocks hold bf16
            # weights that only autocast reconciles with the float32 heads
            with torch.random.fork_rng(devices=devices), trainer.precision_plugin.forward_context():
                # α from the heads alone: it does not depend on the latents, so no backbone forward
                alpha = pl_module.model.instance_alpha(batch["boxes"], batch["instance_mask"], batch["clip_embeds"],
                                                       batch["dino_embeds"], batch["instance_text"])
                generated = pl_module.generate(batch, steps=self.steps)
                truth = pl_module.encoders.decode_latents(batch["latents"])
                images = pl_module.encoders.decode_latents(generated)
        finally:
            pl_module.train(was_training)
        rows = [[], []]
        for i in range(len(batch["ids"])):
            valid = batch["instance_mask"][i]
            boxes, a = batch["boxes"][i][valid].cpu(), alpha[i][valid].cpu()
            rows[0].append(draw_boxes(to_uint8(truth[i]), boxes, a))
            rows[1].append(draw_boxes(to_uint8(images[i]), boxes, a))
        return rows[0], rows[1]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step % self.every_n_steps == 0:  # the untrained baseline, step 0
            self._maybe_log(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._maybe_log(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_log(trainer, pl_module)

    def _maybe_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == self._last_step:  # once per optimizer step
            return
        self._last_step = trainer.global_step
        if trainer.logger is not None and (trainer.is_global_zero or isinstance(trainer.strategy, FSDPStrategy)):
            self.log_images(trainer, pl_module)
