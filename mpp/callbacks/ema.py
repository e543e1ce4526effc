"""An exponential moving average of what trains, and only that.

Lightning's `WeightAveraging` keeps an `AveragedModel` of the whole LightningModule, a deep copy that
would hold a second 12B FLUX backbone; it cannot be limited to some parameters. This callback keeps
one float32 copy of each trainable tensor (heads and LoRA) instead, updated after every
`every_n_steps`-th optimizer step from `start_step` on (before it, the copy follows the weights), and
saved in the checkpoint's callback state, so a resumed run continues the same average.

Where it is on, validation, the image grids and the export use the averaged weights (`averaged`),
and training carries on from its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import lightning as L
import torch


class EMA(L.Callback):
    """Args:
        enabled: keep the average (off by default).
        decay: weight of the old average at each update (0.999: about the last 1000 updates).
        start_step: optimizer step from which the average starts to lag the weights.
        every_n_steps: optimizer steps between updates.
    """

    def __init__(self, enabled: bool = False, decay: float = 0.999, start_step: int = 0, every_n_steps: int = 1):
        if not 0 <= decay < 1:
            raise ValueError(f"--ema.decay must be in [0, 1), got {decay}")
        if start_step < 0 or every_n_steps < 1:
            raise ValueError(f"--ema.start_step must be >= 0 and --ema.every_n_steps >= 1, got {start_step}, "
                             f"{every_n_steps}")
        self.enabled, self.decay, self.start_step, self.every_n_steps = enabled, decay, start_step, every_n_steps
        self.shadow: dict[str, torch.Tensor] | None = None
        self._updated_step = -1
        self._saved: dict[str, torch.Tensor] | None = None
        self._validation = None

    @staticmethod
    def _trainable(pl_module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
        """By full-state-dict name (MppModule drops FSDP's wrapper names), so a checkpoint's EMA reads alike."""
        named = getattr(pl_module, "_named_parameters", pl_module.named_parameters)()
        return {n: p for n, p in named if p.requires_grad}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        params = self._trainable(pl_module)
        if self.shadow is None:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
        elif set(self.shadow) != set(params):
            raise ValueError(f"the checkpoint's EMA holds {len(self.shadow)} tensors, this run trains "
                             f"{len(params)}: --ema settings or the stage differ from the run resumed")
        else:
            self.shadow = {n: t.to(params[n].device) for n, t in self.shadow.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not self.enabled or step == self._updated_step or step % self.every_n_steps:
            return  # not an optimizer step's end (gradient accumulation), or not an update step
        self._updated_step = step
        decay = self.decay if step > self.start_step else 0.0
        for n, p in self._trainable(pl_module).items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - decay)

    @contextlib.contextmanager
    def swapped(self, pl_module: L.LightningModule) -> Iterator[None]:
        """The averaged weights in the module for the duration of the block (nothing when off)."""
        if not self.enabled or self.shadow is None or self._saved is not None:
            yield
            return
        params = self._trainable(pl_module)
        self._saved = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(self._saved[n])
            self._saved = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and self.shadow is not None:
            self._validation = self.swapped(pl_module)
            self._validation.__enter__()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        validation = self._validation
        if validation is not None:
            self._validation = None
            validation.__exit__(None, None, None)

    def state_dict(self) -> dict:
        if not self.enabled or self.shadow is None:
            return {}
        return {"shadow": {n: t.detach().cpu() for n, t in self.shadow.items()}, "updated_step": self._updated_step,
                "decay": self.decay}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.enabled and state_dict.get("shadow"):
            self.shadow = dict(state_dict["shadow"])
            self._updated_step = state_dict["updated_step"]


def averaged(trainer: L.Trainer, pl_module: L.LightningModule):
    """The EMA's weights in `pl_module` for a block, where the run keeps one; a no-op otherwise."""
    ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
    return ema.swapped(pl_module) if ema is not None else contextlib.nullcontext()


def ema_weights(checkpoint: dict, path: str) -> dict[str, torch.Tensor]:
    """The EMA a training checkpoint holds (full-state-dict names); ValueError naming `path` without one."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("EMA") and state.get("shadow"):
            return state["shadow"]
    raise ValueError(f"--ema: {path} holds no EMA (train with --ema.enabled=true)")
