import logging

import lightning as L
import torch
import torch.distributed as dist

from mpp.checkpoints import NonFiniteError

log = logging.getLogger(__name__)


class NonFiniteGuard(L.Callback):
    """Stops training at the first optimizer step whose loss (any micro-batch, any rank) or gradient
    norm is not finite, naming the step, the rank(s) and their samples, before the optimizer applies
    it; and before a checkpoint is ranked by a non-finite validation metric. So the weights that
    checkpoints, "best" rankings and exports see stay finite (`mpp.checkpoints` refuses to write or
    pick non-finite ones in any case).

    The ranks agree by one all-reduce of a flag per optimizer step, so all of them stop (or skip)
    at the same step and none is left waiting in a collective.

    Args:
        max_skipped_steps: optimizer steps with a non-finite loss or gradient that are skipped (no
            update, a warning naming them) before the run stops; 0 stops at the first.
    """

    def __init__(self, max_skipped_steps: int = 0):
        if max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.max_skipped_steps = max_skipped_steps
        self.skipped: list[int] = []  # optimizer steps skipped so far (kept in checkpoints)
        self._ids: list[str] = []
        self._window_ids: list[str] = []  # samples of the micro-batches of the step being accumulated
        self._problems: list[str] = []

    def state_dict(self) -> dict:
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = list(state["skipped"])

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._ids = list(batch.get("ids", [])) if isinstance(batch, dict) else []
        self._window_ids.extend(self._ids)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._problems.append(f"loss {loss.detach().float().mean().item()} on samples {self._ids}")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad.detach().float() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            if not bool(torch.isfinite(norm)):
                self._problems.append(f"gradient norm {norm.item()} over samples {self._window_ids}")
        problems, self._problems, self._window_ids = self._problems, [], []
        reports = _gather(trainer, pl_module, problems)
        if not reports:
            return
        step = trainer.global_step + 1
        text = "; ".join(f"rank {rank}: {', '.join(p)}" for rank, p in reports)
        if len(self.skipped) < self.max_skipped_steps:
            self.skipped.append(step)
            for group in optimizer.param_groups:  # no update at all this step (AdamW skips grad-less params)
                for p in group["params"]:
                    p.grad = None
            log.warning("skipping optimizer step %d (%d of model.max_skipped_steps=%d): non-finite %s",
                        step, len(self.skipped), self.max_skipped_steps, text)
            return
        raise NonFiniteError(f"non-finite training at optimizer step {step} (global_step {trainer.global_step} "
                             f"done; nothing of this step applied): {text}. Skipped before: {self.skipped} "
                             f"(model.max_skipped_steps={self.max_skipped_steps})")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs before the checkpoint callbacks (Lightning orders them last), so nothing is ranked by it
        for monitor in sorted({cb.monitor for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None)}):
            value = trainer.callback_metrics.get(monitor)
            if value is not None and not bool(torch.isfinite(torch.as_tensor(value)).all()):
                raise NonFiniteError(f"validation {monitor} is {float(value)} after global step {trainer.global_step}: "
                                     "the model diverged; no checkpoint is ranked by it")


def _gather(trainer: L.Trainer, pl_module: L.LightningModule, problems: list[str]) -> list[tuple[int, list[str]]]:
    """Every rank's problems, [(rank, problems)] for the ranks that have some, the same on all ranks."""
    flag = torch.tensor(float(bool(problems)), device=pl_module.device)
    if trainer.world_size > 1:
        flag = trainer.strategy.reduce(flag, reduce_op="max")
    if not bool(flag):
        return []
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (trainer.global_rank, problems))
        return [(rank, p) for rank, p in everyone if p]
    return [(trainer.global_rank, problems)]
