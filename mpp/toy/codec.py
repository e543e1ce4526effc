"""PCA patch codec: a linear, differentiable stand-in for FLUX's AutoencoderKL in the toy world.

Each non-overlapping ``p×p`` RGB patch (3·p² values) is projected on the top ``C`` principal
components of the patches of toy scenes and each coefficient divided by its standard deviation:
``encode`` gives ``B×C×H/p×W/p`` whitened coefficients and ``decode`` is the exact linear inverse on
that subspace. Whitening matters for the flow model: raw PCA channels span an 11× range of standard
deviations, so under unit noise the fine-detail channels sit at a tenth of the signal-to-noise ratio
of the first, and an undertrained model leaves them as visible per-patch noise. Like ``AutoencoderKL``, scaling is the
caller's job: the model-space latent is ``(z - config.shift_factor) * config.scaling_factor``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mpp.encoders import VAE_CLASS_PATH

__all__ = ["PatchCodec", "CodecConfig", "psnr"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CodecConfig(dict):
    """Dict with attribute access, like diffusers' FrozenDict (``vae.config.scaling_factor``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB between two image batches (default range [-1, 1])."""
    mse = torch.mean((x.double() - y.double()) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(data_range**2 / mse)).item()


class PatchCodec(torch.nn.Module):
    def __init__(
        self,
        *,
        patch_size: int = 8,
        latent_channels: int = 16,
        in_channels: int = 3,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        dim = in_channels * patch_size * patch_size
        if not 1 <= latent_channels <= dim:
            raise ValueError(f"latent_channels must be in [1, {dim}]")
        self.config = CodecConfig(
            patch_size=int(patch_size),
            latent_channels=int(latent_channels),
            in_channels=int(in_channels),
            scaling_factor=float(scaling_factor),
            shift_factor=float(shift_factor),
        )
        # rows are orthonormal principal directions; mean is the mean patch; channel_std the
        # standard deviation of each coefficient over the fit set (encode divides by it)
        self.register_buffer("components", torch.zeros(latent_channels, dim))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("channel_std", torch.ones(latent_channels))

    # ------------------------------------------------------------------ properties
    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def downsample_factor(self) -> int:
        return self.config.patch_size

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def dtype(self) -> torch.dtype:
        return self.components.dtype

    @property
    def device(self) -> torch.device:
        return self.components.device

    # ------------------------------------------------------------------ patches
    def _to_patches(self, x: Tensor) -> Tensor:
        """B×c×H×W → B×h×w×(c·p·p)."""
        b, c, h, w = x.shape
        p = self.patch_size
        if c != self.config.in_channels or h % p or w % p:
            raise ValueError(
                f"expected B×{self.config.in_channels}×H×W with H, W divisible by {p}, got {tuple(x.shape)}"
            )
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, h // p, w // p, c * p * p)

    def _from_patches(self, patches: Tensor) -> Tensor:
        """B×h×w×(c·p·p) → B×c×H×W."""
        b, h, w, _ = patches.shape
        p, c = self.patch_size, self.config.in_channels
        x = patches.reshape(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, h * p, w * p)

    # ------------------------------------------------------------------ codec
    def encode(self, x: Tensor) -> Tensor:
        """B×3×H×W in [-1, 1] → B×C×H/p×W/p whitened PCA coefficients (before scaling_factor)."""
        patches = self._to_patches(x.to(self.dtype))
        z = (patches - self.mean) @ self.components.T / self.channel_std
        return z.permute(0, 3, 1, 2).contiguous()

    def decode(self, z: Tensor) -> Tensor:
        """B×C×h×w whitened coefficients → B×3×(h·p)×(w·p) image (not clamped); linear, differentiable."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected B×{self.latent_channels}×h×w latents, got {tuple(z.shape)}")
        patches = (z.to(self.dtype).permute(0, 2, 3, 1) * self.channel_std) @ self.components + self.mean
        return self._from_patches(patches)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ fitting
    @classmethod
    @torch.no_grad()
    def fit(cls, images: Tensor, *, patch_size: int = 8, latent_channels: int = 16) -> PatchCodec:
        """PCA over all patches of ``images`` (B×3×H×W in [-1, 1]); deterministic.

        Components are sorted by decreasing variance and their sign fixed so that each one's
        largest-magnitude entry is positive. ``shift_factor``/``scaling_factor`` are set so that
        ``(encode(images) - shift) * scale`` has zero mean and unit variance over the fit set.
        """
        codec = cls(patch_size=patch_size, latent_channels=latent_channels, in_channels=images.shape[1])
        patches = codec._to_patches(images.detach().to(torch.float64, copy=False))
        patches = patches.reshape(-1, patches.shape[-1])
        mean = patches.mean(0)
        centred = patches - mean
        cov = centred.T @ centred / max(1, centred.shape[0] - 1)
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        order = torch.argsort(eigvals, descending=True, stable=True)[:latent_channels]
        comps = eigvecs[:, order].T.contiguous()  # C×D
        idx = comps.abs().argmax(dim=1)
        signs = torch.sign(comps[torch.arange(comps.shape[0]), idx])
        comps = comps * signs[:, None]
        z = centred @ comps.T
        channel_std = z.std(dim=0).clamp_min(1e-6)
        z = z / channel_std
        shift = z.mean().item()
        std = z.std().item()
        codec.components.copy_(comps.to(torch.float32))
        codec.mean.copy_(mean.to(torch.float32))
        codec.channel_std.copy_(channel_std.to(torch.float32))
        codec.config.shift_factor = float(shift)
        codec.config.scaling_factor = float(1.0 / std) if std > 0 else 1.0
        return codec

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path, **_ignored) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cls = type(self)
        config = {"_class_name": cls.__name__, VAE_CLASS_PATH: f"{cls.__module__}.{cls.__qualname__}", **self.config}
        tmp = path / f".{CONFIG_NAME}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path / CONFIG_NAME)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        tmp = path / f".{WEIGHTS_NAME}.tmp{os.getpid()}"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, path, subfolder: str | None = None, torch_dtype: torch.dtype | None = None, **_ignored):
        path = Path(path)
        if subfolder:
            path = path / subfolder
        config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        name = config.pop("_class_name", cls.__name__)
        if name != cls.__name__:
            raise ValueError(f"{path / CONFIG_NAME} holds a {name}, not a {cls.__name__}")
        known = ("patch_size", "latent_channels", "in_channels", "scaling_factor", "shift_factor")
        codec = cls(**{k: config[k] for k in known if k in config})
        state = load_file(str(path / WEIGHTS_NAME))
        codec.load_state_dict(state)
        if torch_dtype is not None:
            codec = codec.to(torch_dtype)
        return codec.eval().requires_grad_(False)
