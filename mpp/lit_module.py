"""The LightningModule: a thin shell around `mpp.nn.MppFlux`, the losses and the optimizer."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, is_dataclass, replace

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor

from mpp.callbacks import CheckpointHousekeeping, FinalCheckpoint, NonFiniteGuard
from mpp.checkpoints import load_checkpoint
from mpp.encoders import EncoderSettings, Encoders, embedding_dims, parse_dtype
from mpp.flow import flow_matching_loss, noisy_latents, predicted_x0, sample_timesteps, shift_for
from mpp.losses import alpha_loss, alpha_metrics, alpha_targets, box_embeddings, identity_loss, identity_weights
from mpp.nn import (
    CONDITIONING,
    DEFAULT_GUIDANCE,
    STAGE_GROUPS,
    HeadsConfig,
    MppFlux,
    backbone_config,
    build_backbone,
    set_trainable,
)
from mpp.sampling import SamplingConfig, generate_one, sample_latents

log = logging.getLogger(__name__)


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
        dino_target: what each box's DINOv2 embedding is pulled toward: "reference" (the instance's
            reference embedding from preparation) or "crop" (DINOv2 of the same box decoded from the
            clean training latents: the target then comes from the frame itself, so framing, background
            and lighting of a reference image are not part of what the model is asked to match).
        dino_blur: σ in pixels (at DINOv2's input size) of a Gaussian blur of each generated crop before
            DINOv2 (0: none), so that the model cannot lower the loss with pixel-level patterns.
        dino_views: each box is judged as the mean over this many randomly zoomed/shifted views of its
            crop (1: the crop alone), so a pattern that fools the encoder at one framing does not pay.
        alpha_bce_weight: BCE (on the logit) of α toward each instance's role; acts where α trains (stage 1).
        timestep_sampler, logit_mean, logit_std: the training timesteps' distribution (`mpp.flow.sample_timesteps`).
        shift: fixed shift of the training timesteps (None: none).
        resolution_shift: instead of `shift`, FLUX's shift for each batch's image token count
            (`mpp.flow.resolution_shift`; a batch is one bucket, so one size).
    """

    flow_weight: float = 1.0
    dino_identity_weight: float = 0.0
    dino_t_threshold: float = 0.5
    dino_own_timesteps: bool = True
    dino_samples: int = 2
    dino_views: int = 1
    dino_target: str = "crop"
    dino_blur: float = 0.0
    alpha_bce_weight: float = 1.0
    timestep_sampler: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float | None = None
    resolution_shift: bool = False

    def __post_init__(self):
        if self.dino_target not in ("reference", "crop"):
            raise ValueError(f"model.loss.dino_target must be 'reference' or 'crop', got {self.dino_target!r}")
        if self.dino_views < 1:
            raise ValueError(f"model.loss.dino_views must be >= 1, got {self.dino_views}")


FSDP_WRAPPED = "_fsdp_wrapped_module."

# checkpoints written before HeadsConfig and SamplingConfig moved below Lightning pickle their
# hyperparameters under these names
Heads, Sampling = HeadsConfig, SamplingConfig


def check_lr_scale(scale: dict[str, float], groups: tuple[str, ...]) -> dict[str, float]:
    """`model.lr_scale` checked against the stage's trained groups."""
    unknown = sorted(set(scale) - set(groups))
    if unknown:
        raise ValueError(f"model.lr_scale names {unknown}, which this stage does not train; its groups: {list(groups)}")
    bad = {g: v for g, v in scale.items() if not v >= 0}
    if bad:
        raise ValueError(f"model.lr_scale must be >= 0 (0 freezes a group), got {bad}")
    if all(scale.get(g, 1.0) == 0 for g in groups):
        raise ValueError("model.lr_scale freezes every group this stage trains")
    return {g: float(v) for g, v in scale.items()}


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
        guidance: guidance value fed to a guidance-distilled backbone, in training and sampling.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up in optimizer steps, then constant.
        lr_scale: a multiplier of `lr` for some of this stage's parameter groups (`mpp.nn.GROUPS`), e.g.
            `{layout: 0.1}` to move what an earlier stage trained more slowly than a new head; 0 freezes
            the group for this run (it is still saved).
        seed: seeds the noise and timesteps, together with the step and the rank.
        sampling: Euler sampling of logged images and generation (`predict`, `mpp generate`).
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
        heads: HeadsConfig | None = None,
        loss: Loss | None = None,
        guidance: float = DEFAULT_GUIDANCE,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_scale: dict[str, float] | None = None,
        seed: int = 0,
        sampling: SamplingConfig | None = None,
        max_skipped_steps: int = 0,
    ):
        super().__init__()
        if stage not in STAGE_GROUPS:
            raise ValueError(f"model.stage must be one of {sorted(STAGE_GROUPS)}, got {stage}")
        if max_skipped_steps < 0:
            raise ValueError(f"model.max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.save_hyperparameters()
        self.stage = stage
        self.lr_scale = check_lr_scale(lr_scale or {}, STAGE_GROUPS[stage])
        self.encoder_settings = encoders or EncoderSettings()
        self.heads = heads or HeadsConfig()
        self.loss_cfg = loss or Loss()
        self.sampling = sampling or SamplingConfig()
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
        self.model = MppFlux(backbone, **dims, heads=self.heads)
        set_trainable(self.model, [g for g in STAGE_GROUPS[self.stage] if self.lr_scale.get(g, 1.0) > 0])
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

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The state-dict shapes of mpp's own weights in this config's model, built on the meta device
        from the backbone's config alone (no weight read: seconds, even for a 12B backbone)."""
        config = backbone_config(self.hparams.backbone, subfolder=self.hparams.backbone_subfolder)
        with torch.device("meta"):
            model = MppFlux(build_backbone(config=config), **embedding_dims(self.encoder_settings), heads=self.heads)
        owned = {id(p) for group in model.parameter_groups().values() for p in group}
        return {f"model.{n}": tuple(p.shape) for n, p in model.named_parameters() if id(p) in owned}

    def trainable_keys(self) -> set[str]:
        return {name for name, p in self._named_parameters() if p.requires_grad}

    def _load_previous_stage(self, path: str) -> None:
        """The weights of every group trained up to the previous stage; the groups no stage has trained
        yet keep this run's fresh initialisation (so a head may change its shape between stages)."""
        ckpt = load_checkpoint(path)
        stage = ckpt["mpp"]["stage"]
        trained = {g for s in STAGE_GROUPS if s <= stage for g in STAGE_GROUPS[s]}
        expected = {id(p) for g in trained for p in self.model.parameter_groups()[g]}
        expected_keys = {n for n, p in self._named_parameters() if id(p) in expected}
        missing = sorted(expected_keys - set(ckpt["state_dict"]))
        if missing:
            raise ValueError(f"{path}: stage-{stage} checkpoint lacks {len(missing)} weights it "
                             f"trained, e.g. {missing[:5]}")
        unknown = sorted(set(ckpt["state_dict"]) - self.owned_keys())
        if unknown:
            raise ValueError(f"{path}: checkpoint holds {len(unknown)} weights this model lacks, e.g. {unknown[:5]}")
        state = {k: v for k, v in ckpt["state_dict"].items() if k in expected_keys}
        self.check_shapes(state, ckpt.get("hyper_parameters"), f"{path} (stage {stage})")
        self.load_state_dict(state, strict=False)
        log.info("loaded %d weights of stage %d from %s", len(state), stage, path)

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
            state = load_checkpoint(self.trainer.ckpt_path, mmap=True)["state_dict"]
        missing = sorted(self.owned_keys() - set(state))
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} of this model's trainable weights, e.g. {missing[:5]}")
        self.check_shapes(state, checkpoint.get("hyper_parameters"), self.trainer.ckpt_path or "checkpoint")
        self.micro_step = checkpoint["mpp"]["micro_step"]

    def check_shapes(self, state: dict, hyper_parameters: dict | None, source: str) -> None:
        """Refuses checkpoint weights whose shapes differ from this model's, naming the `--model.heads`
        settings the checkpoint was trained with where they differ from this run's."""
        own = {n: p.shape for n, p in self._named_parameters()}
        changed = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k])]
        if not changed:
            return
        trained = (hyper_parameters or {}).get("heads")
        trained = asdict(trained) if is_dataclass(trained) else dict(trained or {})
        current = asdict(self.heads)
        flags = [f"--model.heads.{k}={v} (this run: {current[k]})" for k, v in sorted(trained.items())
                 if k in current and v != current[k]]
        first = changed[0]
        raise ValueError(f"{source}: trained with other --model.heads settings; {len(changed)} weights differ in "
                         f"shape from this run's model (e.g. {first}: {tuple(state[first].shape)} there, "
                         f"{tuple(own[first])} here){'; it was trained with ' + ', '.join(flags) if flags else ''}: "
                         "pass the same")

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
        bce = alpha_loss(out.alpha_logit, roles, valid & out.has_reference)  # α is 0 without a reference
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
            weights = identity_weights(out.alpha, roles, valid, out.has_reference)[idx]
            return self._identity_on(x0_hat, batch, idx, weights, g)
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
        return self._identity_on(predicted_x0(x_t_id, t_id, out_id.velocity), batch, idx, weights, g)

    def _identity_on(self, x0_hat: Tensor, batch: dict, idx: Tensor, weights: Tensor, g: torch.Generator | None):
        """The identity loss of the samples `idx` of `batch`, whose predicted clean latents are `x0_hat`."""
        target = batch["dino_embeds"][idx]
        if self.loss_cfg.dino_target == "crop":
            with torch.no_grad():
                target = box_embeddings(batch["latents"][idx], batch["boxes"][idx], weights > 0, encoders=self.encoders,
                                        margin=self.encoder_settings.crop_margin, blur=self.loss_cfg.dino_blur)
        return identity_loss(x0_hat, boxes=batch["boxes"][idx], weights=weights,
                             reference_dino=target, encoders=self.encoders,
                             margin=self.encoder_settings.crop_margin,
                             gradient_checkpointing=self.heads.gradient_checkpointing,
                             views=self.loss_cfg.dino_views, generator=g, blur=self.loss_cfg.dino_blur)

    def _noise_and_t(self, x0: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        noise = torch.randn(x0.shape, generator=g).to(x0)
        cfg = self.loss_cfg
        t = sample_timesteps(x0.shape[0], generator=g, sampler=cfg.timestep_sampler, mean=cfg.logit_mean,
                             std=cfg.logit_std, shift=shift_for(tuple(x0.shape[-2:]), cfg.shift,
                                                                cfg.resolution_shift)).to(x0)
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
        g = torch.Generator().manual_seed(self.sampling.seed if seed is None else seed)
        noise = torch.randn(batch["latents"].shape, generator=g).to(self.device)
        sampling = replace(self.sampling, steps=steps or self.sampling.steps)
        return sample_latents(self.model, batch, noise, sampling, guidance=self.hparams.guidance)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Samples one layout of `data.predict_file` with `sampling` (seed `sampling.seed` + its index);
        `mpp.callbacks.LayoutWriter` writes what this returns."""
        pixels, alpha, seed = generate_one(self.model, self.encoders, batch["layout"], sampling=self.sampling,
                                           index=batch["index"], guidance=self.hparams.guidance)
        return {"layout": batch["layout"], "pixels": pixels, "alpha": alpha, "seed": seed}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        fsdp = isinstance(self.trainer.strategy, FSDPStrategy)
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and fsdp:
            # Lightning's FSDP precision plugin refuses norm clipping; FSDP computes the norm across shards
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        groups = self.model.parameter_groups()
        lr = self.hparams.lr
        param_groups = [{"params": [p for p in groups[g] if p.requires_grad], "lr": lr * self.lr_scale.get(g, 1.0),
                         "name": g} for g in STAGE_GROUPS[self.stage]]
        opt = torch.optim.AdamW([g for g in param_groups if g["params"]], lr=lr,
                                weight_decay=self.hparams.weight_decay)
        warmup = self.hparams.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
