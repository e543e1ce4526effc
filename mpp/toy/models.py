"""The toy model bundle: tiny encoders and backbone of the real classes, built deterministically.

``build_toy_models(cache_dir)`` writes a folder laid out like a FLUX.1 checkpoint plus the extra
encoders mpp uses, every part loadable with the real ``from_pretrained``::

    vae/             PatchCodec (mpp.toy.codec) fitted by PCA on toy scenes
    text_encoder/    CLIPTextModel          tokenizer/    word-level PreTrainedTokenizerFast
    text_encoder_2/  T5EncoderModel         tokenizer_2/  same tokenizer
    image_encoder/   CLIPVisionModelWithProjection (+ preprocessor_config.json)
    dino/            Dinov2Model (+ preprocessor_config.json)
    transformer/     FluxTransformer2DModel(**toy_flux_config()), random init, or pretrained as a
                     text-to-image flow model on toy scenes when pretrain_steps > 0 (mpp.toy.pretrain)
    pretrain.json    steps and held-out loss before/after (only when pretrained)
    vision_pretrain.json  held-out identity retrieval of image_encoder/ and dino/ before/after their
                     pretraining to see identity (mpp.toy.vision; only when vision_steps > 0)
    mpp_toy.json     marker: format version, seed, world parameters, pretraining budget
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mpp.encoders import VAE_CLASS_PATH

from .codec import PatchCodec
from .pretrain import pretrain_toy_backbone
from .scenes import ToyWorld
from .shipped import MARKER_NAME, SHIPPED_DIR, copy_shipped, read_marker
from .vision import CLUTTER_PROB, pretrain_vision_encoders

log = logging.getLogger(__name__)

__all__ = [
    "build_toy_models",
    "toy_flux_config",
    "build_toy_tokenizer",
    "SPECIAL_TOKENS",
    "MARKER_NAME",
    "FORMAT_VERSION",
    "FIT_INDEX_OFFSET",
    "MAX_LENGTH",
    "PRETRAIN_BATCH_SIZE",
    "PRETRAIN_LR",
    "PRETRAIN_SCENES",
]

FORMAT_VERSION = 5  # 5: the vision encoders see only the world's characters
FIT_INDEX_OFFSET = 10_000_000  # codec fit scenes: far from any dataset's indices
MAX_LENGTH = 32
# id order is fixed: pad=0, unk=1, bos=2, eos=3, then the vocabulary sorted.
# (eos must not be 2: CLIPTextModel treats eos_token_id == 2 as a legacy config and pools at argmax id.)
SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>"}
HIDDEN = 32
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
ENCODER_IMAGE_SIZE = 32
# The vision encoders are wider and finer than the text ones: at width 32 with 8-px patches the
# pretrained toy DINOv2 retrieved 33 % of held-out characters (2000 steps); they must see texture.
VISION_HIDDEN = 64
VISION_PATCH = 4
VISION_LAYERS = 3
# backbone pretraining settings used by build_toy_models (recorded in the marker when pretraining)
PRETRAIN_BATCH_SIZE = 32
PRETRAIN_LR = 1e-3
PRETRAIN_SCENES = 2048


def toy_flux_config() -> dict:
    """A tiny ``FluxTransformer2DModel`` config matching the toy encoders and the 16-channel codec.

    The residual stream is twice the 64 packed latent values of a token: a flow model has to carry
    x_t through to predict ε − x0, and at width 64 that copy took the whole stream (held-out
    text-to-image samples stayed per-patch noise; pretraining loss 0.94 after 1500 steps against
    0.72 after 800 at width 128, at 2.5× the cost per step).
    """
    return {
        "in_channels": 64,  # 16 latent channels packed 2×2
        "num_layers": 4,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 8,
        "joint_attention_dim": HIDDEN,  # T5 d_model
        "pooled_projection_dim": HIDDEN,  # CLIP text hidden size (pooled output)
        "guidance_embeds": True,
        "axes_dims_rope": [4, 6, 6],  # sums to attention_head_dim
    }


# ------------------------------------------------------------------------------- tokenizer


def build_toy_tokenizer(world: ToyWorld, max_length: int = MAX_LENGTH):
    """Word-level ``PreTrainedTokenizerFast`` over ``world.vocabulary()``; adds bos/eos."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS[k] for k in ("pad", "unk", "bos", "eos")]
    vocab = {tok: i for i, tok in enumerate(specials + world.vocabulary())}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    bos, eos = SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} $B:1 {eos}:1",
        special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words, " ," -> ","
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=max_length,
        padding_side="right",
        clean_up_tokenization_spaces=True,
    )


# ---------------------------------------------------------------------------------- models


def _seeded(seed: int):
    torch.manual_seed(seed)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _preprocessor_config(kind: str, mean: list[float], std: list[float]) -> dict:
    # `image_mean`, `image_std` and `size` are what mpp reads; the other keys let
    # AutoImageProcessor build the matching slow processor as well.
    return {
        "image_processor_type": kind,
        "image_mean": mean,
        "image_std": std,
        "size": ENCODER_IMAGE_SIZE,
        "crop_size": ENCODER_IMAGE_SIZE,
        "do_resize": True,
        "do_center_crop": True,
        "do_rescale": True,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
    }


def _fit_codec(world: ToyWorld, fit_samples: int) -> PatchCodec:
    images = np.stack([world.scene(FIT_INDEX_OFFSET + i).image for i in range(fit_samples)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
    return PatchCodec.fit(x, patch_size=8, latent_channels=16)


def _build(out: Path, world: ToyWorld, seed: int, fit_samples: int) -> None:
    from diffusers import FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2Config,
        Dinov2Model,
        T5Config,
        T5EncoderModel,
    )

    _fit_codec(world, fit_samples).save_pretrained(out / "vae")

    tokenizer = build_toy_tokenizer(world)
    for sub in ("tokenizer", "tokenizer_2"):
        tokenizer.save_pretrained(out / sub)
        # transformers 5 writes "TokenizersBackend"; the 4.x name loads in both
        cfg_path = out / sub / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        _write_json(cfg_path, cfg)
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in SPECIAL_TOKENS.items()}
    vocab_size = len(tokenizer)

    _seeded(seed + 1)
    clip_text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            projection_dim=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MAX_LENGTH,
            pad_token_id=ids["pad"],
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
        )
    )
    clip_text.save_pretrained(out / "text_encoder")

    _seeded(seed + 2)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=HIDDEN,
            d_kv=8,
            d_ff=2 * HIDDEN,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=MAX_LENGTH,
            feed_forward_proj="gated-gelu",
            pad_token_id=ids["pad"],
            eos_token_id=ids["eos"],
            decoder_start_token_id=ids["pad"],
        )
    )
    t5.save_pretrained(out / "text_encoder_2")

    _seeded(seed + 3)
    clip_vision = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            image_size=ENCODER_IMAGE_SIZE,
            patch_size=VISION_PATCH,
            hidden_size=VISION_HIDDEN,
            intermediate_size=2 * VISION_HIDDEN,
            projection_dim=HIDDEN,
            num_hidden_layers=VISION_LAYERS,
            num_attention_heads=4,
        )
    )
    clip_vision.save_pretrained(out / "image_encoder")
    _write_json(out / "image_encoder" / "preprocessor_config.json",
                _preprocessor_config("CLIPImageProcessor", CLIP_MEAN, CLIP_STD))

    _seeded(seed + 4)
    dino = Dinov2Model(
        Dinov2Config(
            image_size=ENCODER_IMAGE_SIZE,
            patch_size=VISION_PATCH,
            hidden_size=VISION_HIDDEN,
            num_hidden_layers=VISION_LAYERS,
            num_attention_heads=4,
            mlp_ratio=2,
        )
    )
    dino.save_pretrained(out / "dino")
    _write_json(out / "dino" / "preprocessor_config.json",
                _preprocessor_config("BitImageProcessor", IMAGENET_MEAN, IMAGENET_STD))

    _seeded(seed + 5)
    FluxTransformer2DModel(**toy_flux_config()).save_pretrained(out / "transformer")


def _pretrain(out: Path, world: ToyWorld, seed: int, steps: int) -> None:
    result = pretrain_toy_backbone(out, world=world, steps=steps, batch_size=PRETRAIN_BATCH_SIZE, lr=PRETRAIN_LR,
                                   seed=seed, num_scenes=PRETRAIN_SCENES)
    # no wall time here: the bundle's files stay a pure function of its parameters
    _write_json(out / "pretrain.json", {k: result[k] for k in ("steps", "initial_loss", "final_loss")})


def _pretrain_vision(out: Path, world: ToyWorld, seed: int, steps: int) -> None:
    result = pretrain_vision_encoders(out, codec=PatchCodec.from_pretrained(out / "vae"),
                                      identities=world.identities, steps=steps, seed=seed)
    _write_json(out / "vision_pretrain.json", result)


def _marker(world: ToyWorld, seed: int, fit_samples: int, pretrain_steps: int = 0, vision_steps: int = 0) -> dict:
    marker = {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "fit_samples": int(fit_samples),
        "world": world.config,
        "flux": toy_flux_config(),
        "pretrain_steps": int(pretrain_steps),
        "vision_steps": int(vision_steps),
    }
    if pretrain_steps:
        marker["pretrain"] = {"batch_size": PRETRAIN_BATCH_SIZE, "lr": PRETRAIN_LR, "num_scenes": PRETRAIN_SCENES}
    if vision_steps:
        marker["vision"] = {"clutter_prob": CLUTTER_PROB}
    return marker


def _name_codec_class(bundle: Path) -> None:
    """A bundle written before the VAE config named its class by import path (how `mpp.encoders`
    finds the codec) gets the name, instead of a rebuild: the weights are the same."""
    path = bundle / "vae" / "config.json"
    if path.is_file() and VAE_CLASS_PATH not in json.loads(path.read_text(encoding="utf-8")):
        PatchCodec.from_pretrained(bundle / "vae").save_pretrained(bundle / "vae")


def build_toy_models(
    cache_dir,
    *,
    world: ToyWorld | None = None,
    seed: int = 0,
    fit_samples: int = 256,
    overwrite: bool = False,
    pretrain_steps: int = 0,
    vision_steps: int = 0,
) -> Path:
    """Build (or reuse) the toy bundle in ``cache_dir`` and return its path.

    A no-op when ``cache_dir/mpp_toy.json`` matches the requested parameters (unless
    ``overwrite``); a copy of the bundle that ships with mpp (:mod:`mpp.toy.shipped`) when that one
    was built for them (unless ``overwrite``, which always builds). The bundle is written to a
    temporary sibling folder and renamed into place, so an interrupted build never leaves a half
    bundle; concurrent builders (e.g. DDP ranks) are safe:
    the first complete bundle wins and the others discard theirs.

    ``pretrain_steps > 0`` trains the random toy transformer as a text-to-image flow model on toy
    scenes (:func:`mpp.toy.pretrain.pretrain_toy_backbone`) inside the temporary folder, before the
    rename; ``mpp.toy.pretrain.DEFAULT_PRETRAIN_STEPS`` is the budget for real use. ``vision_steps > 0``
    first trains the toy CLIP vision and DINOv2 encoders to see identity (:mod:`mpp.toy.vision`;
    ``VISION_PRETRAIN_STEPS`` for real use). Both are part of the marker, so a different value rebuilds.
    """
    if pretrain_steps < 0 or vision_steps < 0:
        raise ValueError(f"pretrain_steps and vision_steps must be >= 0, got {pretrain_steps}, {vision_steps}")
    cache_dir = Path(cache_dir).expanduser().absolute()
    world = world if world is not None else ToyWorld(seed=seed)
    marker = _marker(world, seed, fit_samples, pretrain_steps, vision_steps)
    if not overwrite and read_marker(cache_dir) == marker:
        _name_codec_class(cache_dir)
        return cache_dir

    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" bars, once per model
    try:
        if not overwrite and copy_shipped(tmp, marker):
            log.info("toy models: copying the bundle that ships with mpp (%s) to %s (`python -m mpp.toy models "
                     "%s --overwrite` builds it here instead)", SHIPPED_DIR, cache_dir, cache_dir)
        else:
            log.info("building the toy models in %s, once: encoders and codec, then %d vision and %d backbone "
                     "pretraining steps", cache_dir, vision_steps, pretrain_steps)
            _build(tmp, world, seed, fit_samples)
            if vision_steps:
                _pretrain_vision(tmp, world, seed, vision_steps)
            if pretrain_steps:
                _pretrain(tmp, world, seed, pretrain_steps)
        _write_json(tmp / MARKER_NAME, marker)  # last: a bundle with a marker is complete
        if cache_dir.exists():
            if not overwrite and read_marker(cache_dir) == marker:
                return cache_dir  # another process finished first
            old = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.old-", dir=cache_dir.parent))
            os.replace(cache_dir, old / "bundle")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, cache_dir)
        except OSError:
            # lost a race against another builder that renamed its bundle in between
            if read_marker(cache_dir) != marker:
                raise
        log.info("toy models ready in %s (%.0fs)", cache_dir, time.perf_counter() - start)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)
    return cache_dir
