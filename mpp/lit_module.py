"""The LightningModule: a thin shell around `mpp.nn.MppFlux`, the losses and the optimizer."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor

from mpp.callbacks import CheckpointHousekeeping, FinalCheckpoint, NonFiniteGuard
from mpp.data.dataset import CONDITIONING
from mpp.encoders import EncoderSettings, Encoders, embedding_dims, parse_dtype
from mpp.flow import flow_matching_loss, noisy_latents, predicted_x0, sample_timesteps
from mpp.losses import alpha_loss, alpha_metrics, alpha_targets, identity_loss, identity_weights
from mpp.nn import MppFlux, build_backbone, set_trainable
from mpp.nn.model import STAGE_GROUPS

log = logging.getLogger(__name__)



@dataclass
class Heads:
    """Widths and placement of the heads and the LoRA (DESIGN.md section 3)."""

    layout_double_blocks: list[int] | None = None
    layout_single_blocks: list[int] | None = None
    lora_rank: int = 128
    lora_alpha: float | None = None
    lora_scope: str = "layout"
    identity_dim: int = 256
    modulation_rank: int = 8
    fourier_freqs: int = 8
    modality_dropout: float = 0.1
    use_layout_head: bool = True
    gradient_checkpointing: bool = False


@dataclass
class Loss:
    """Loss weights and the timestep sampler (DESIGN.md section 4).

    Args:
        flow_weight: weight of the flow-matching MSE.
        dino_identity_weight: weight of the DINO identity loss (0: off).
        dino_t_threshold: the identity loss judges x̂0 = x_t − t·v̂ only for t below this.
        dino_own_timesteps: the identity term runs its own forward of `dino_samples` samples of each
            micro-batch at t ~ U(0, dino_t_threshold), so every step carries identity signal; False
            judges the flow batch's samples that happen to fall below the threshold (no extra forward;
            with shift 3 about 14 % of samples, so most micro-batches of 2 carry none).
        dino_samples: samples per micro-batch in the identity forward (those with a foreground instance first).
        alpha_bce_weight: BCE (on the logit) of α toward each instance's role; acts where α trains (stage 1).
    """

    flow_weight: float = 1.0
    dino_identity_weight: float = 0.0
    dino_t_threshold: float = 0.5
    dino_own_timesteps: bool = True
    dino_samples: int = 2
    alpha_bce_weight: float = 1.0
    timestep_sampler: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float | None = None


@dataclass
class Sampling:
    """Euler sampling for logged images and generation."""

    steps: int = 28
    shift: float | None = 3.0
    seed: int = 0
    layout_guidance: float = 1.0  # classifier-free guidance on the layout (mpp.generate.sample_latents); 1: off


FSDP_WRAPPED = "_fsdp_wrapped_module."


def _seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) % (2**63 - 1)
    return h


class MppModule(L.LightningModule):
    """Trains the heads and LoRA of one stage on a frozen FLUX backbone.

    Args:
        stage: 1 layout, 2 identity, 3 feedback; decides what trains and nothing else does.
        backbone: hub id or folder holding the FLUX transformer.
        backbone_subfolder: subfolder of `backbone` with the transformer, or None.
        backbone_dtype: dtype of the frozen backbone weights.
        encoders: the frozen encoders (linked from data.encoders by the CLI).
        heads: head and LoRA sizes.
        loss: loss weights and timestep sampler.
        guidance: guidance value fed to a guidance-distilled backbone while training.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up in optimizer steps, then constant.
        seed: seeds the noise and timesteps, together with the step and the rank.
        sampling: Euler sampling of logged images.
        max_skipped_steps: optimizer steps with a non-finite loss or gradient that are skipped before
            the run stops (`mpp.callbacks.NonFiniteGuard`); 0 stops at the first.
    """

    def __init__(
        self,
        *,
        stage: int = 1,
        backbone: str = "black-forest-labs/FLUX.1-dev",
        backbone_subfolder: str | None = "transformer",
        backbone_dtype: str = "bfloat16",
        encoders: EncoderSettings | None = None,
        heads: Heads | None = None,
        loss: Loss | None = None,
        guidance: float = 3.5,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        seed: int = 0,
        sampling: Sampling | None = None,
        max_skipped_steps: int = 0,
    ):
        super().__init__()
        if stage not in STAGE_GROUPS:
            raise ValueError(f"model.stage must be one of {sorted(STAGE_GROUPS)}, got {stage}")
        if max_skipped_steps < 0:
            raise ValueError(f"model.max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.save_hyperparameters()
        self.stage = stage
        self.encoder_settings = encoders or EncoderSettings()
        self.heads = heads or Heads()
        self.loss_cfg = loss or Loss()
        self.sampling = sampling or Sampling()
        self.model: MppFlux | None = None
        self._encoders: Encoders | None = None
        self.init_from: str | None = None  # a previous stage's checkpoint: weights only
        self.micro_step = 0  # training micro-batches done; seeds noise so a resumed run draws the same
        self.strict_loading = False  # checkpoints hold only mpp's own weights; checked in on_load_checkpoint

    # ----- building ----------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        # cuDNN's attention kernels turned the toy run's bf16 training to NaN after the first optimizer
        # step (torch 2.11 + cu130 on an H200; flash, memory-efficient and math kernels train the same
        # run normally), so training never picks them.
        torch.backends.cuda.enable_cudnn_sdp(False)
        dims = embedding_dims(self.encoder_settings)
        backbone = build_backbone(self.hparams.backbone, subfolder=self.hparams.backbone_subfolder,
                                  torch_dtype=parse_dtype(self.hparams.backbone_dtype, "model.backbone_dtype"))
        self.model = MppFlux(backbone, **dims, **asdict(self.heads))
        set_trainable(self.model, STAGE_GROUPS[self.stage])
        if self.init_from is not None:
            self._load_previous_stage(self.init_from)

    @property
    def encoders(self) -> Encoders:
        """The frozen encoders on this module's device (loaded on first use: the VAE and DINOv2 for
        the identity loss and image logging; the text encoders only for generation)."""
        if self._encoders is None or self._encoders.device != self.device:
            self._encoders = Encoders(self.encoder_settings, device=self.device,
                                      dtype=parse_dtype(self.hparams.backbone_dtype, "model.backbone_dtype"))
        return self._encoders

    def _named_parameters(self):
        """named_parameters() with the names a full state dict uses (FSDP's wrapper names removed)."""
        return ((name.replace(FSDP_WRAPPED, ""), p) for name, p in self.named_parameters())

    def owned_keys(self) -> set[str]:
        """State-dict keys of every parameter mpp adds to the backbone (heads and LoRA)."""
        owned = {id(p) for group in self.model.parameter_groups().values() for p in group}
        return {name for name, p in self._named_parameters() if id(p) in owned}

    def trainable_keys(self) -> set[str]:
        return {name for name, p in self._named_parameters() if p.requires_grad}

    def _load_previous_stage(self, path: str) -> None:
        from mpp.checkpoints import load_checkpoint

        ckpt = load_checkpoint(path)
        previous = STAGE_GROUPS[ckpt["mpp"]["stage"]]
        expected = {id(p) for g in previous for p in self.model.parameter_groups()[g]}
        expected_keys = {n for n, p in self._named_parameters() if id(p) in expected}
        missing = sorted(expected_keys - set(ckpt["state_dict"]))
        if missing:
            raise ValueError(f"{path}: stage-{ckpt['mpp']['stage']} checkpoint lacks {len(missing)} weights it trained, "
                             f"e.g. {missing[:5]}")
        unknown = sorted(set(ckpt["state_dict"]) - self.owned_keys())
        if unknown:
            raise ValueError(f"{path}: checkpoint holds {len(unknown)} weights this model lacks, e.g. {unknown[:5]}")
        self.load_state_dict(ckpt["state_dict"], strict=False)
        log.info("loaded %d weights of stage %d from %s", len(ckpt["state_dict"]), ckpt["mpp"]["stage"], path)

    # ----- checkpoints: only mpp's own weights, never the backbone ------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        owned = self.owned_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in owned}
        # "keys": what this checkpoint must hold to be loadable (mpp.checkpoints.is_loadable)
        checkpoint["mpp"] = {"stage": self.stage, "micro_step": self.micro_step,
                             "log_version": getattr(self.logger, "version", None), "keys": sorted(owned)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stage = checkpoint["mpp"]["stage"]
        if stage != self.stage:
            raise ValueError(f"resuming stage {self.stage} from a stage-{stage} checkpoint: pass it as a "
                             "previous stage's --ckpt_path (stage + 1) or use the same stage's config")
        state = checkpoint.get("state_dict")
        if state is None:  # FSDP's strategy loads the weights itself and hands this hook the rest
            from mpp.checkpoints import load_checkpoint

            state = load_checkpoint(self.trainer.ckpt_path, mmap=True)["state_dict"]
        missing = sorted(self.owned_keys() - set(state))
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} of this model's trainable weights, e.g. {missing[:5]}")
        self.micro_step = checkpoint["mpp"]["micro_step"]

    # ----- steps -------------------------------------------------------------------------------
    def _generator(self, *parts: int) -> torch.Generator:
        return torch.Generator().manual_seed(_seed(self.hparams.seed, *parts))

    def forward(self, latents: Tensor, t: Tensor, batch: dict):
        guidance = torch.full_like(t, self.hparams.guidance)
        return self.model(latents=latents, timesteps=t, guidance=guidance, **{k: batch[k] for k in CONDITIONING})

    def _losses(self, batch: dict, noise: Tensor, t: Tensor, prefix: str,
                g: torch.Generator | None = None) -> dict[str, Tensor]:
        x0 = batch["latents"]
        x_t = noisy_latents(x0, noise, t)
        out = self(x_t, t, batch)
        cfg = self.loss_cfg
        flow = flow_matching_loss(out.velocity, x0, noise)
        logs = {f"{prefix}loss/flow_matching": flow, f"{prefix}loss/reconstruction": flow}
        total = cfg.flow_weight * flow
        valid = batch["instance_mask"]
        roles = alpha_targets(batch["foreground"], out.has_reference)
        if cfg.dino_identity_weight > 0:
            ident = self._identity(batch, noise, t, x_t, out, g)
            if ident is not None:
                total = total + cfg.dino_identity_weight * ident[0]
                logs[f"{prefix}loss/dino_identity"] = ident[0]
                logs[f"{prefix}metrics/dino_similarity_mean"] = ident[1]
        bce = alpha_loss(out.alpha_logit, roles, valid)
        if bce is not None:
            logs[f"{prefix}loss/alpha_bce"] = bce
            if cfg.alpha_bce_weight > 0 and "alpha" in STAGE_GROUPS[self.stage]:
                total = total + cfg.alpha_bce_weight * bce
        logs[f"{prefix}loss/total"] = total
        logs.update({f"{prefix}metrics/{k}": v for k, v in alpha_metrics(out.alpha, roles, valid).items()})
        if out.feedback_magnitude is not None:
            logs[f"{prefix}metrics/feedback_magnitude"] = out.feedback_magnitude.detach()
        return logs

    def _identity(self, batch: dict, noise: Tensor, t: Tensor, x_t: Tensor, out, g: torch.Generator | None):
        """The identity term (loss, similarity) or None; see `Loss.dino_own_timesteps`."""
        cfg = self.loss_cfg
        roles, valid = batch["foreground"], batch["instance_mask"]
        if not cfg.dino_own_timesteps:
            idx = (t < cfg.dino_t_threshold).nonzero().flatten()
            x0_hat = predicted_x0(x_t[idx], t[idx], out.velocity[idx])
            return self._identity_on(x0_hat, batch, idx, identity_weights(out.alpha, roles, valid, out.has_reference)[idx])
        carrying = (identity_weights(out.alpha, roles, valid) > 0).any(-1)
        order = torch.argsort((~carrying).to(torch.uint8), stable=True)[: cfg.dino_samples]
        idx = order[carrying[order]]
        if not len(idx):
            return None
        g = g or torch.Generator().manual_seed(0)
        t_id = (torch.rand(len(idx), generator=g) * cfg.dino_t_threshold).to(t)
        x_t_id = noisy_latents(batch["latents"][idx], noise[idx], t_id)
        out_id = self(x_t_id, t_id, {k: batch[k][idx] for k in CONDITIONING})
        weights = identity_weights(out.alpha[idx], roles[idx], valid[idx], out_id.has_reference)
        return self._identity_on(predicted_x0(x_t_id, t_id, out_id.velocity), batch, idx, weights)

    def _identity_on(self, x0_hat: Tensor, batch: dict, idx: Tensor, weights: Tensor):
        """The identity loss of the samples `idx` of `batch`, whose predicted clean latents are `x0_hat`."""
        return identity_loss(x0_hat, boxes=batch["boxes"][idx], weights=weights,
                             reference_dino=batch["dino_embeds"][idx], encoders=self.encoders,
                             margin=self.encoder_settings.crop_margin,
                             gradient_checkpointing=self.heads.gradient_checkpointing)

    def _noise_and_t(self, x0: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        noise = torch.randn(x0.shape, generator=g).to(x0)
        cfg = self.loss_cfg
        t = sample_timesteps(x0.shape[0], generator=g, sampler=cfg.timestep_sampler, mean=cfg.logit_mean,
                             std=cfg.logit_std, shift=cfg.shift).to(x0)
        return noise, t

    def configure_callbacks(self):
        """The reliability callbacks every run has, whatever its config lists (docs/reliability.md)."""
        return [NonFiniteGuard(self.hparams.max_skipped_steps), CheckpointHousekeeping(), FinalCheckpoint()]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        step = self.micro_step
        self.micro_step += 1
        noise, t = self._noise_and_t(batch["latents"], self._generator(step, self.global_rank))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # modality dropout draws from here, per step
            torch.manual_seed(_seed(self.hparams.seed, step, self.global_rank, 1))
            logs = self._losses(batch, noise, t, prefix="", g=self._generator(step, self.global_rank, 2))
        if batch.get("placeholder"):
            # every record of this rank's batch failed validation (MppDataModule): the same computation
            # on a stand-in, weighted zero, so this rank still takes part in the step's collectives
            return logs["loss/total"] * 0.0
        self.log_dict(logs, prog_bar=False, batch_size=len(batch["ids"]))
        self.log("loss", logs["loss/total"], prog_bar=True, logger=False, batch_size=len(batch["ids"]))
        return logs["loss/total"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if "latents" not in batch:
            return
        # the same noise and timesteps at every validation, so val/loss is comparable across steps
        noise, t = self._noise_and_t(batch["latents"], self._generator(-1, batch_idx, self.global_rank))
        logs = self._losses(batch, noise, t, prefix="val/", g=self._generator(-1, batch_idx, self.global_rank, 2))
        n = len(batch["ids"])
        self.log("val/loss", logs["val/loss/flow_matching"], sync_dist=True, batch_size=n)
        # not synced: a term can be absent from one rank's batch (no foreground instance), and a synced
        # log that one rank skips would hang the others
        self.log_dict({k: v for k, v in logs.items() if k != "val/loss/reconstruction"}, batch_size=n)

    @torch.no_grad()
    def generate(self, batch: dict, *, seed: int | None = None, steps: int | None = None) -> Tensor:
        """Euler-samples latents for the batch's layouts from a fixed seed; returns B×C×h×w."""
        from mpp.generate import sample_latents

        g = torch.Generator().manual_seed(self.sampling.seed if seed is None else seed)
        noise = torch.randn(batch["latents"].shape, generator=g).to(self.device)
        return sample_latents(self.model, batch, noise, steps=steps or self.sampling.steps,
                              shift=self.sampling.shift, guidance=self.hparams.guidance,
                              layout_guidance=self.sampling.layout_guidance)

    def sampler(self, **overrides):
        """`sampling` and `guidance` as `mpp.generate.Sampler`, with `overrides` of its fields."""
        from mpp.generate import Sampler

        return Sampler(**{**asdict(self.sampling), "guidance": self.hparams.guidance, **overrides})

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Samples one layout of `data.predict_file` with `sampling` (seed `sampling.seed` + its index);
        `mpp.callbacks.LayoutWriter` writes what this returns."""
        from mpp.generate import generate_one

        pixels, alpha, seed = generate_one(self.model, self.encoders, batch["layout"], resolution=batch["resolution"],
                                           sampler=self.sampler(), index=batch["index"])
        return {"layout": batch["layout"], "pixels": pixels, "alpha": alpha, "seed": seed}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning's FSDP precision plugin refuses norm clipping; FSDP computes the norm across shards
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup = self.hparams.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
