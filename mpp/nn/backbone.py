"""Loading or building the frozen FLUX transformer."""

from __future__ import annotations

import os

import torch
from diffusers import FluxTransformer2DModel


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
    if (
        subfolder
        and os.path.isdir(path)
        and not os.path.isdir(os.path.join(path, subfolder))
        and os.path.isfile(os.path.join(path, "config.json"))
    ):
        subfolder = None
    return FluxTransformer2DModel.from_pretrained(path, subfolder=subfolder, torch_dtype=torch_dtype)
