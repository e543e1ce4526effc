"""Pretraining the toy backbone as a plain text-to-image flow model.

Real FLUX arrives pretrained: it knows what "a red striped circle" looks like, and mpp only adds
layout control on top. The toy bundle's ``FluxTransformer2DModel`` starts random, so
:func:`pretrain_toy_backbone` full fine-tunes it on toy scenes with FLUX's own recipe, driven exactly
as ``FluxPipeline`` drives it (packed 2×2 latents, ``img_ids``/``txt_ids``, T5 states + CLIP pooled
prompt, guidance 3.5, timestep in [0, 1]). The captions name shapes, colours and the background but
not positions, so the pretrained model knows *what* to draw, not *where*.

Scenes come from indices far from any dataset's (``PRETRAIN_INDEX_OFFSET + i``), are encoded once up
front and sampled in minibatches; every random draw comes from generators seeded by ``seed``, so
two runs give identical weights.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from diffusers.utils import logging as diffusers_logging
from torch import Tensor
from tqdm import tqdm

from mpp.encoders import Encoders
from mpp.flow import flow_matching_loss, noisy_latents, sample_timesteps
from mpp.nn import flux_velocity

from .bundle import toy_encoder_settings
from .scenes import ToyWorld

__all__ = [
    "DEFAULT_PRETRAIN_STEPS",
    "PRETRAIN_INDEX_OFFSET",
    "ToyBatch",
    "encode_toy_scenes",
    "pretrain_toy_backbone",
    "toy_flow_loss",
]

log = logging.getLogger(__name__)

PRETRAIN_INDEX_OFFSET = 20_000_000  # training scenes: disjoint from datasets (0..) and the codec fit (10M..)
HELDOUT_INDEX_OFFSET = 30_000_000  # the fixed held-out batch behind initial_loss / final_loss
# Budget for real use (``python -m mpp.toy models``, configs/toy.yaml): 1200 steps at batch 32, about
# 5 minutes on two CPU threads. Not converged; with fewer steps the samples are per-patch colour
# noise that no layout head can place.
DEFAULT_PRETRAIN_STEPS = 1200
HELDOUT_SIZE = 64
_ENCODE_CHUNK = 256


@dataclass
class ToyBatch:
    """Encoded scenes: FLUX-scaled latents N×16×h×w, T5 states N×L×D, CLIP pooled N×P."""

    latents: Tensor
    prompt_embeds: Tensor
    pooled: Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.latents)

    def take(self, idx: Tensor) -> ToyBatch:
        return ToyBatch(self.latents[idx], self.prompt_embeds[idx], self.pooled[idx],
                        [self.captions[i] for i in idx.tolist()])


@torch.no_grad()
def encode_toy_scenes(encoders, world: ToyWorld, indices) -> ToyBatch:
    """Renders the scenes ``world.scene(i)`` and encodes them with the bundle's codec and text encoders."""
    latents, states, pooled, captions = [], [], [], []
    indices = list(indices)
    for start in range(0, len(indices), _ENCODE_CHUNK):
        scenes = [world.scene(i) for i in indices[start : start + _ENCODE_CHUNK]]
        images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        texts = [s.caption for s in scenes]
        latents.append(encoders.encode_images(images).float())
        t5, clip = encoders.encode_prompts(texts)
        states.append(t5.float())
        pooled.append(clip.float())
        captions += texts
    return ToyBatch(torch.cat(latents), torch.cat(states), torch.cat(pooled), captions)


def toy_flow_loss(transformer, batch: ToyBatch, noise: Tensor, t: Tensor) -> Tensor:
    """Flow-matching MSE of ``transformer`` on ``batch`` for the given noise and timesteps."""
    x_t = noisy_latents(batch.latents, noise, t)
    velocity = flux_velocity(transformer, x_t, t, batch.prompt_embeds, batch.pooled)
    return flow_matching_loss(velocity, batch.latents, noise)


def _heldout_loss(transformer, batch: ToyBatch, noise: Tensor, t: Tensor) -> float:
    was_training = transformer.training
    transformer.eval()
    with torch.no_grad():
        loss = toy_flow_loss(transformer, batch, noise, t).item()
    transformer.train(was_training)
    return loss


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _save_atomic(transformer, target: Path) -> None:
    target = target.absolute()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        transformer.save_pretrained(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def pretrain_toy_backbone(
    models_dir,
    *,
    world: ToyWorld,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    num_scenes: int = 2048,
    log_every: int = 100,
) -> dict:
    """Full fine-tunes ``models_dir/transformer`` as a text-to-image flow model on toy scenes.

    ``num_scenes`` scenes (indices ``PRETRAIN_INDEX_OFFSET + i``) are encoded once, then ``steps``
    AdamW steps on minibatches of ``batch_size`` (logit-normal timesteps, target ε − x0, guidance
    3.5). The trained model is saved back with ``save_pretrained`` atomically (temporary folder beside
    it, then rename). Deterministic for a given ``seed``.

    Returns ``{"steps", "initial_loss", "final_loss", "seconds"}``; the losses are measured on a fixed
    held-out batch (``HELDOUT_SIZE`` other scenes, fixed noise and timesteps) before and after.
    """
    if steps < 0 or batch_size < 1 or num_scenes < 1:
        raise ValueError(f"need steps >= 0, batch_size >= 1 and num_scenes >= 1 "
                         f"(got {steps}, {batch_size}, {num_scenes})")
    # At most two intra-op threads: at batch 32 the 128-wide toy model took 0.74 s/step on one and
    # 0.51 s on two (0.25 s on two by late 2026); more add spin-waiting, which on a loaded CPU made
    # steps up to 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        return _pretrain(Path(models_dir), world=world, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                         num_scenes=num_scenes, log_every=log_every)
    finally:
        torch.set_num_threads(threads)


def _pretrain(models_dir: Path, *, world, steps, batch_size, lr, seed, num_scenes, log_every) -> dict:
    start = time.perf_counter()
    torch.manual_seed(seed)
    encoders = Encoders(toy_encoder_settings(models_dir))
    data = encode_toy_scenes(encoders, world, range(PRETRAIN_INDEX_OFFSET, PRETRAIN_INDEX_OFFSET + num_scenes))
    heldout = encode_toy_scenes(encoders, world, range(HELDOUT_INDEX_OFFSET, HELDOUT_INDEX_OFFSET + HELDOUT_SIZE))
    del encoders
    g_eval = torch.Generator().manual_seed(seed + 1)
    eval_noise = torch.randn(heldout.latents.shape, generator=g_eval)
    eval_t = sample_timesteps(len(heldout), generator=g_eval)

    transformer = FluxTransformer2DModel.from_pretrained(models_dir / "transformer", torch_dtype=torch.float32)
    transformer.requires_grad_(True).train()
    initial_loss = _heldout_loss(transformer, heldout, eval_noise, eval_t)
    encode_seconds = time.perf_counter() - start
    log.info("toy backbone pretraining: %d scenes encoded in %.1fs, held-out loss %.4f",
             num_scenes, encode_seconds, initial_loss)

    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, min(100, steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, warmup))
    g = torch.Generator().manual_seed(seed)
    running = None
    train_start = time.perf_counter()
    bar = tqdm(range(steps), desc="toy backbone pretraining", unit="step", mininterval=1.0)
    for step in bar:
        idx = torch.randint(len(data), (batch_size,), generator=g)
        batch = data.take(idx)
        noise = torch.randn(batch.latents.shape, generator=g)
        t = sample_timesteps(batch_size, generator=g)
        loss = toy_flow_loss(transformer, batch, noise, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            rate = (step + 1) / (time.perf_counter() - train_start)
            held_out = _heldout_loss(transformer, heldout, eval_noise, eval_t)
            bar.set_postfix(loss=f"{running:.4f}", held_out=f"{held_out:.4f}")
            log.debug("pretrain step %d/%d  loss %.4f (ema)  held-out %.4f  lr %.2e  %.2f steps/s",
                      step + 1, steps, running, held_out, scheduler.get_last_lr()[0], rate)

    final_loss = _heldout_loss(transformer, heldout, eval_noise, eval_t)
    transformer.eval().requires_grad_(False)
    bars = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        _save_atomic(transformer, models_dir / "transformer")
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()
    seconds = time.perf_counter() - start
    log.info("toy backbone pretrained: %d steps, held-out loss %.4f -> %.4f, %.1fs", steps, initial_loss, final_loss,
             seconds)
    return {"steps": int(steps), "initial_loss": float(initial_loss), "final_loss": float(final_loss),
            "seconds": float(seconds)}
