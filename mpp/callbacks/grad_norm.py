import lightning as L
import torch


class GradNorm(L.Callback):
    """Logs `train/grad_norm`, the global L2 norm of the trainable gradients before each
    optimizer step (before clipping)."""

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad.detach().float() for p in pl_module.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False)
