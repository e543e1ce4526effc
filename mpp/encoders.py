"""The frozen encoders, in one place for data preparation, the identity loss and inference.

`Encoders` loads each model lazily with `from_pretrained` from a hub id or a local folder, so a
training run that needs only the VAE decoder and DINOv2 never loads T5. Images are tensors in
[-1, 1], boxes are normalized xyxy.

The VAE is diffusers' `AutoencoderKL` unless its `config.json` names another class by import path,
`"_class_path": "package.module.Class"`: a `torch.nn.Module` with `from_pretrained(path,
subfolder=..., revision=...)`, a `config` with `scaling_factor` and `shift_factor`, a
`downsample_factor`, and `encode(x)`/`decode(z)` that return tensors (the toy world's
`mpp.toy.codec.PatchCodec` is one).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import asdict, dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from mpp.nn.backbone import explain_missing

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str, flag: str = "dtype") -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{flag} must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


@dataclass
class EncoderSettings:
    """Which encoders produce (and must keep producing) a dataset's tensors.

    Args:
        flux: hub id or folder of a FLUX bundle with vae/, text_encoder/, tokenizer/,
            text_encoder_2/ and tokenizer_2/ (FLUX.1-dev's layout).
        clip_vision: hub id or folder of a `CLIPVisionModelWithProjection`.
        dino: hub id or folder of a `Dinov2Model`.
        revision: hub revision for all three, or None.
        t5_max_length: prompt tokens for T5 (FLUX.1-dev uses 512).
        clip_max_length: tokens for the CLIP text encoder.
        crop_margin: fraction of the box size added on each side of a reference crop.
    """

    flux: str = "black-forest-labs/FLUX.1-dev"
    clip_vision: str = "openai/clip-vit-large-patch14"
    dino: str = "facebook/dinov2-large"
    revision: str | None = None
    t5_max_length: int = 512
    clip_max_length: int = 77
    crop_margin: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """What a dataset records and must match: the settings with local folders made absolute,
        so a relative and an absolute path to the same folder agree, and for local folders a
        fingerprint of the weights that produce the tensors, so a model re-trained or re-fitted
        in place does not pass for the one the dataset was prepared with."""
        d = self.to_dict()
        fingerprints = {}
        for key, subfolders in (("flux", FLUX_ENCODER_SUBFOLDERS), ("clip_vision", ("",)), ("dino", ("",))):
            if os.path.isdir(d[key]):
                d[key] = os.path.realpath(d[key])
                for sub in subfolders:
                    fingerprints[os.path.join(key, sub).rstrip("/")] = weights_fingerprint(os.path.join(d[key], sub))
        if fingerprints:
            d["fingerprints"] = fingerprints
        return d


FLUX_ENCODER_SUBFOLDERS = ("vae", "text_encoder", "text_encoder_2")
_FINGERPRINT_BYTES = 1 << 20


def weights_fingerprint(folder: str) -> str:
    """sha256 over the weight files of `folder` (names, sizes, first and last MiB of each): cheap
    for multi-GB encoders, and any re-training or re-fitting changes it."""
    h = hashlib.sha256()
    names = os.listdir(folder) if os.path.isdir(folder) else []
    names = sorted(n for n in names if n.endswith((".safetensors", ".bin")))
    for name in names:
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        h.update(f"{name}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(_FINGERPRINT_BYTES))
            if size > _FINGERPRINT_BYTES:
                f.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
                h.update(f.read())
    return h.hexdigest()[:16]


def _read_json(path_or_id: str, filename: str, subfolder: str | None = None,
               revision: str | None = None) -> dict | None:
    local = os.path.join(path_or_id, subfolder or "", filename)
    if os.path.isdir(path_or_id):
        if not os.path.exists(local):
            return None
        with open(local) as f:
            return json.load(f)
    from transformers.utils import cached_file

    resolved = cached_file(path_or_id, filename, subfolder=subfolder or "", revision=revision,
                           _raise_exceptions_for_missing_entries=False)
    if resolved is None:
        return None
    with open(resolved) as f:
        return json.load(f)


def _normalization(path: str, revision: str | None, default_mean, default_std):
    cfg = _read_json(path, "preprocessor_config.json", revision=revision) or {}
    return tuple(cfg.get("image_mean", default_mean)), tuple(cfg.get("image_std", default_std))


VAE_CLASS_PATH = "_class_path"  # the key of a VAE config.json that names a class that is not AutoencoderKL


def _import_class(path: str, where: str) -> type[torch.nn.Module]:
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{where}: cannot import {path!r}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"{where}: {path!r} is not an importable torch.nn.Module class")
    return cls


def embedding_dims(settings: EncoderSettings) -> dict[str, int]:
    """Widths of the stored embeddings, read from the encoders' configs without loading weights."""
    from transformers import AutoConfig

    with explain_missing("data.encoders.clip_vision", settings.clip_vision, "the CLIP vision encoder's config",
                         also=(ValueError,)):  # AutoConfig: a folder without config.json
        clip = AutoConfig.from_pretrained(settings.clip_vision, revision=settings.revision)
    with explain_missing("data.encoders.dino", settings.dino, "the DINOv2 config", also=(ValueError,)):
        dino = AutoConfig.from_pretrained(settings.dino, revision=settings.revision)
    with explain_missing("data.encoders.flux", settings.flux, "FLUX's text_encoder/config.json", also=(ValueError,)):
        text = AutoConfig.from_pretrained(settings.flux, subfolder="text_encoder", revision=settings.revision)
    return {"clip_dim": clip.projection_dim, "dino_dim": dino.hidden_size, "text_dim": text.hidden_size}


def stored_shapes(settings: EncoderSettings) -> dict[str, tuple[int, ...]]:
    """The shape each prepared embedding must have for these encoders (per instance: the trailing
    shape), read from the configs without loading weights; `mpp.data.dataset` checks records against it."""
    from transformers import AutoConfig

    dims = embedding_dims(settings)
    t5 = AutoConfig.from_pretrained(settings.flux, subfolder="text_encoder_2", revision=settings.revision)
    return {"clip_embeds": (dims["clip_dim"],), "dino_embeds": (dims["dino_dim"],),
            "instance_text": (dims["text_dim"],), "pooled_prompt_embeds": (dims["text_dim"],),
            "prompt_embeds": (settings.t5_max_length, t5.d_model)}


def crop_boxes(images: Tensor, boxes: Tensor, *, size: int, margin: float = 0.0) -> Tensor:
    """Crops each box (with `margin` of its size on each side) and resizes it to size×size.

    images: B×C×H×W; boxes: B×N×4 normalized xyxy. Returns B×N×C×size×size. Differentiable with
    respect to `images`, so the identity loss can backpropagate through it.
    """
    b, c, h, w = images.shape
    n = boxes.shape[1]
    out = images.new_zeros(b, n, c, size, size)
    bw = (boxes[..., 2] - boxes[..., 0]) * margin
    bh = (boxes[..., 3] - boxes[..., 1]) * margin
    x0 = ((boxes[..., 0] - bw).clamp(0, 1) * w).floor().long()
    y0 = ((boxes[..., 1] - bh).clamp(0, 1) * h).floor().long()
    x1 = torch.maximum(((boxes[..., 2] + bw).clamp(0, 1) * w).ceil().long(), x0 + 1).clamp(max=w)
    y1 = torch.maximum(((boxes[..., 3] + bh).clamp(0, 1) * h).ceil().long(), y0 + 1).clamp(max=h)
    x0, y0 = torch.minimum(x0, x1 - 1), torch.minimum(y0, y1 - 1)
    for i in range(b):
        for k in range(n):
            crop = images[i : i + 1, :, y0[i, k] : y1[i, k], x0[i, k] : x1[i, k]]
            out[i, k] = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return out


class Encoders:
    """Frozen FLUX VAE, T5 and CLIP text, CLIP vision and DINOv2, loaded on first use.

    Args:
        settings: which models to load.
        dtype: compute dtype of the models.
        device: where they run.
    """

    def __init__(self, settings: EncoderSettings, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        self.settings = settings
        self.dtype = dtype
        self.device = torch.device(device)

    def _ready(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    # ----- VAE ---------------------------------------------------------------------------------
    @cached_property
    def vae(self) -> torch.nn.Module:
        s = self.settings
        cfg = _read_json(s.flux, "config.json", subfolder="vae", revision=s.revision) or {}
        if cfg.get(VAE_CLASS_PATH):
            cls = _import_class(cfg[VAE_CLASS_PATH], f"{s.flux}/vae/config.json {VAE_CLASS_PATH}")
            with explain_missing("data.encoders.flux", s.flux, "the VAE (vae/)"):
                return self._ready(cls.from_pretrained(s.flux, subfolder="vae", revision=s.revision))
        from diffusers import AutoencoderKL

        with explain_missing("data.encoders.flux", s.flux, "the VAE (vae/)"):
            return self._ready(AutoencoderKL.from_pretrained(s.flux, subfolder="vae", revision=s.revision))

    @property
    def vae_scale(self) -> tuple[float, float]:
        cfg = self.vae.config
        return float(cfg.scaling_factor), float(cfg.shift_factor or 0.0)

    @property
    def vae_downsample(self) -> int:
        if hasattr(self.vae, "downsample_factor"):
            return int(self.vae.downsample_factor)
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_images(self, images: Tensor) -> Tensor:
        """B×3×H×W in [-1, 1] → latents scaled and shifted as FLUX expects (the posterior mode)."""
        x = images.to(self.device, self.dtype)
        if hasattr(self.vae, "downsample_factor"):
            z = self.vae.encode(x)
        else:
            z = self.vae.encode(x).latent_dist.mode()
        scale, shift = self.vae_scale
        return (z - shift) * scale

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Inverse of `encode_images`: latents → B×3×H×W images, roughly in [-1, 1]. Differentiable."""
        scale, shift = self.vae_scale
        z = latents.to(self.dtype) / scale + shift
        if hasattr(self.vae, "downsample_factor"):
            return self.vae.decode(z)
        return self.vae.decode(z).sample

    # ----- text --------------------------------------------------------------------------------
    @cached_property
    def clip_tokenizer(self):
        from transformers import AutoTokenizer

        with explain_missing("data.encoders.flux", self.settings.flux, "the CLIP tokenizer (tokenizer/)"):
            return AutoTokenizer.from_pretrained(self.settings.flux, subfolder="tokenizer",
                                                 revision=self.settings.revision)

    @cached_property
    def t5_tokenizer(self):
        from transformers import AutoTokenizer

        s = self.settings
        with explain_missing("data.encoders.flux", s.flux, "the T5 tokenizer (tokenizer_2/)"):
            return AutoTokenizer.from_pretrained(s.flux, subfolder="tokenizer_2", revision=s.revision)

    @cached_property
    def clip_text(self) -> torch.nn.Module:
        from transformers import CLIPTextModel

        s = self.settings
        with explain_missing("data.encoders.flux", s.flux, "the CLIP text encoder (text_encoder/)"):
            return self._ready(CLIPTextModel.from_pretrained(s.flux, subfolder="text_encoder", revision=s.revision))

    @cached_property
    def t5(self) -> torch.nn.Module:
        from transformers import T5EncoderModel

        s = self.settings
        with explain_missing("data.encoders.flux", s.flux, "the T5 encoder (text_encoder_2/)"):
            return self._ready(T5EncoderModel.from_pretrained(s.flux, subfolder="text_encoder_2", revision=s.revision))

    @torch.no_grad()
    def encode_texts_pooled(self, texts: list[str]) -> Tensor:
        """CLIP text pooled output, one row per text (prompt pooling and instance captions)."""
        if not texts:
            return torch.zeros(0, self.clip_text.config.hidden_size, device=self.device, dtype=self.dtype)
        tok = self.clip_tokenizer(texts, padding="max_length", max_length=self.settings.clip_max_length,
                                  truncation=True, return_tensors="pt")
        return self.clip_text(input_ids=tok.input_ids.to(self.device)).pooler_output

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """FLUX prompt conditioning: (T5 states B×L×D, CLIP pooled B×Dpool)."""
        tok = self.t5_tokenizer(prompts, padding="max_length", max_length=self.settings.t5_max_length,
                                truncation=True, return_tensors="pt")
        states = self.t5(input_ids=tok.input_ids.to(self.device)).last_hidden_state
        return states, self.encode_texts_pooled(prompts)

    # ----- image embeddings of crops ---------------------------------------------------------
    @cached_property
    def clip_vision(self) -> torch.nn.Module:
        from transformers import CLIPVisionModelWithProjection

        s = self.settings
        with explain_missing("data.encoders.clip_vision", s.clip_vision, "the CLIP vision encoder"):
            return self._ready(CLIPVisionModelWithProjection.from_pretrained(s.clip_vision, revision=s.revision))

    @cached_property
    def dino(self) -> torch.nn.Module:
        from transformers import Dinov2Model

        with explain_missing("data.encoders.dino", self.settings.dino, "DINOv2"):
            return self._ready(Dinov2Model.from_pretrained(self.settings.dino, revision=self.settings.revision))

    @cached_property
    def _clip_norm(self):
        return _normalization(self.settings.clip_vision, self.settings.revision, CLIP_MEAN, CLIP_STD)

    @cached_property
    def _dino_norm(self):
        return _normalization(self.settings.dino, self.settings.revision, IMAGENET_MEAN, IMAGENET_STD)

    def _normalize(self, crops: Tensor, norm) -> Tensor:
        mean = torch.tensor(norm[0], device=crops.device, dtype=crops.dtype).view(1, 3, 1, 1)
        std = torch.tensor(norm[1], device=crops.device, dtype=crops.dtype).view(1, 3, 1, 1)
        return ((crops + 1) / 2 - mean) / std

    @property
    def clip_size(self) -> int:
        return int(self.clip_vision.config.image_size)

    @cached_property
    def dino_size(self) -> int:
        # DINOv2 interpolates its position embeddings, so the size comes from its preprocessing
        cfg = _read_json(self.settings.dino, "preprocessor_config.json", revision=self.settings.revision) or {}
        size = cfg.get("crop_size") or cfg.get("size") or 224
        if isinstance(size, dict):
            size = size.get("height") or size["shortest_edge"]
        return int(size)

    def clip_image_embeds(self, crops: Tensor) -> Tensor:
        """K×3×S×S crops in [-1, 1] → K×Dclip projected CLIP image embeddings."""
        if not len(crops):
            return crops.new_zeros(0, self.clip_vision.config.projection_dim, device=self.device, dtype=self.dtype)
        x = F.interpolate(crops.to(self.device, self.dtype), size=self.clip_size, mode="bilinear", antialias=True)
        return self.clip_vision(pixel_values=self._normalize(x, self._clip_norm)).image_embeds

    def dino_embeds(self, crops: Tensor) -> Tensor:
        """K×3×S×S crops in [-1, 1] → K×Ddino DINOv2 CLS embeddings. Differentiable w.r.t. crops."""
        if not len(crops):
            return crops.new_zeros(0, self.dino.config.hidden_size, device=self.device, dtype=self.dtype)
        x = F.interpolate(crops.to(self.device, self.dtype), size=self.dino_size, mode="bilinear", antialias=True)
        return self.dino(pixel_values=self._normalize(x, self._dino_norm)).pooler_output
