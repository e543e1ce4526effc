"""Loading or building the frozen FLUX transformer, and calling it as diffusers does."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import FluxTransformer2DModel
from huggingface_hub.errors import HFValidationError
from torch import Tensor

from .config import DEFAULT_GUIDANCE
from .packing import image_ids, pack_latents, text_ids, unpack_latents


@contextmanager
def explain_missing(flag: str, path: str, what: str, also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Turns a failed `from_pretrained` of `path` (set by `flag`) into a ValueError that says what is
    missing and how to provide it, instead of the loader's traceback; `also`: further exception types
    that mean "not there" for this loader."""
    try:
        yield
    except (OSError, HFValidationError, *also) as e:
        local = os.path.isdir(path)
        where = (f"the local folder {path!r} does not hold it" if local else
                 f"{path!r} is not a local folder, and the Hugging Face hub could not provide it (offline, "
                 "not logged in, licence not accepted, or no such repository)")
        raise ValueError(
            f"{flag}: cannot load {what} from {path!r}: {where}.\n"
            f"  the loader said: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n"
            "  to fix it, either download it once (`huggingface-cli login`, accept the model's licence on "
            f"its hub page, then `huggingface-cli download {path}`; HF_HUB_OFFLINE=1 then uses the cache), "
            f"or pass a local copy: --{flag}=/path/to/folder"
        ) from e


def build_backbone(
    pretrained_model_name_or_path: str | os.PathLike | None = None,
    *,
    subfolder: str | None = "transformer",
    config: dict | None = None,
    torch_dtype: torch.dtype | None = None,
) -> FluxTransformer2DModel:
    """``from_pretrained(path, subfolder=...)`` for a hub id or local folder, else ``from_config(config)``.

    Exactly one of ``pretrained_model_name_or_path`` and ``config`` must be given. A local folder that
    holds the transformer itself (``config.json`` at its root, no ``subfolder``) is also accepted.
    """
    if (pretrained_model_name_or_path is None) == (config is None):
        raise ValueError(
            "build_backbone needs exactly one of `pretrained_model_name_or_path` and `config` "
            f"(got pretrained_model_name_or_path={pretrained_model_name_or_path!r}, "
            f"config={'given' if config is not None else None})"
        )
    if config is not None:
        model = FluxTransformer2DModel.from_config(dict(config))
        return model.to(torch_dtype) if torch_dtype is not None else model
    path = os.fspath(pretrained_model_name_or_path)
    subfolder = _subfolder(path, subfolder)
    what = "the FLUX transformer" + (f" ({subfolder}/config.json and its weights)" if subfolder else "")
    with explain_missing("model.backbone", path, what):
        return FluxTransformer2DModel.from_pretrained(path, subfolder=subfolder, torch_dtype=torch_dtype)


def _subfolder(path: str, subfolder: str | None) -> str | None:
    """`subfolder`, unless the local folder `path` holds the transformer itself."""
    if (subfolder and os.path.isdir(path) and not os.path.isdir(os.path.join(path, subfolder))
            and os.path.isfile(os.path.join(path, "config.json"))):
        return None
    return subfolder


def backbone_config(pretrained_model_name_or_path: str | os.PathLike, *, subfolder: str | None = "transformer") -> dict:
    """The FLUX transformer's config where `build_backbone` would load it from, without its weights."""
    path = os.fspath(pretrained_model_name_or_path)
    subfolder = _subfolder(path, subfolder)
    with explain_missing("model.backbone", path, "the FLUX transformer's config"):
        return dict(FluxTransformer2DModel.load_config(path, subfolder=subfolder))


def flux_velocity(transformer: FluxTransformer2DModel, latents: Tensor, timesteps: Tensor, prompt_embeds: Tensor,
                  pooled_prompt_embeds: Tensor, guidance: float = DEFAULT_GUIDANCE) -> Tensor:
    """The plain backbone's velocity for B×C×h×w latents, called as ``FluxPipeline`` calls it (packed
    latents, ``img_ids``/``txt_ids``, timesteps in [0, 1]); inputs are cast to its weights' dtype."""
    b, _, h, w = latents.shape
    device, dtype = latents.device, next(transformer.parameters()).dtype
    kwargs = {}
    if transformer.config.guidance_embeds:
        kwargs["guidance"] = torch.full((b,), float(guidance), device=device, dtype=dtype)
    out = transformer(
        hidden_states=pack_latents(latents.to(dtype)),
        encoder_hidden_states=prompt_embeds.to(dtype),
        pooled_projections=pooled_prompt_embeds.to(dtype),
        timestep=timesteps.to(device=device, dtype=dtype),  # the model multiplies by 1000
        img_ids=image_ids(h // 2, w // 2, device=device, dtype=dtype),
        txt_ids=text_ids(prompt_embeds.shape[1], device=device, dtype=dtype),
        return_dict=False,
        **kwargs,
    )[0]
    return unpack_latents(out, h, w)
