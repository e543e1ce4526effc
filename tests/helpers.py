"""Test-only callbacks, referenced by class path from tests/conf/*.yaml, and random toy inputs."""

import json
import os

import lightning as L
import torch

BOXES = [[0.1, 0.1, 0.6, 0.5], [0.4, 0.3, 0.9, 0.9], [0.0, 0.0, 0.3, 0.3]]


def toy_conditioning(b: int, n: int, generator: torch.Generator, *, txt_len: int = 32, width: int = 32,
                     dino_width: int = 64) -> dict:
    """Random MppFlux conditioning for the toy bundle (text and CLIP widths 32, DINOv2 64), n ≤ 3 fixed boxes."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return {"prompt_embeds": randn(b, txt_len, width), "pooled_prompt_embeds": randn(b, width),
            "boxes": torch.tensor(BOXES[:n]).expand(b, n, 4), "instance_mask": torch.ones(b, n, dtype=torch.bool),
            "instance_text": randn(b, n, width), "clip_embeds": randn(b, n, width), "dino_embeds": randn(b, n, dino_width)}


class Recorder(L.Callback):
    """Records each training batch's loss and sample ids; writes them per rank at the end."""

    def __init__(self, out_dir: str | None = None):
        self.out_dir = out_dir
        self.losses: list[float] = []
        self.ids: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.ids.extend(batch["ids"])

    def on_train_end(self, trainer, pl_module):
        if self.out_dir:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
                json.dump({"losses": self.losses, "ids": self.ids, "steps": trainer.global_step,
                           "bad": sorted(getattr(trainer.datamodule, "bad_records", {}))}, f)


class SignalAt(L.Callback):
    """Sends `signum` as training batch number `batch` (counted in this run) starts, as a scheduler
    would: to this process, or with `group` to its whole process group (DataLoader workers included);
    with `rank`, only that rank sends it."""

    def __init__(self, batch: int = 5, signum: int = 15, group: bool = False, rank: int | None = None):
        self.batch, self.signum, self.group, self.rank, self.seen = batch, signum, group, rank, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen += 1
        if self.seen == self.batch and self.rank in (None, trainer.global_rank):
            if self.group:
                os.killpg(os.getpgid(0), self.signum)
            else:
                os.kill(os.getpid(), self.signum)


class RankRecorder(Recorder):
    """A Recorder writing to $MPP_RECORD_DIR (set by a test that launches processes)."""

    def __init__(self):
        super().__init__(out_dir=os.environ["MPP_RECORD_DIR"])


class PoisonGradient(L.Callback):
    """Makes the gradients of training micro-batch number `batch` (1-based, counted in this run) NaN
    after its backward, as an overflow would."""

    def __init__(self, batch: int = 3):
        self.batch, self.seen = batch, 0

    def on_after_backward(self, trainer, pl_module):
        self.seen += 1
        if self.seen == self.batch:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
                    return
