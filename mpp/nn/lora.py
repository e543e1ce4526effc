"""LoRA on the backbone's attention projections (peft) and the helpers that let mpp choose, per call,
whether the adapter contributes.

Scope ``"all"``: the adapter is injected into every double and single block and is active wherever the
projection is used (the backbone's own forward included).

Scope ``"layout"``: the adapter is injected only into the layout blocks, and mpp's block forward calls
``module.base_layer`` on the base FLUX path, so that path runs exactly pretrained; the adapter's delta
is added only inside the Assemble-Attn branch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

ADAPTER_NAME = "mpp"
LORA_SCOPES = ("layout", "all")
DOUBLE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
SINGLE_TARGETS = ("to_q", "to_k", "to_v")


def check_scope(lora_scope: str) -> str:
    if lora_scope not in LORA_SCOPES:
        raise ValueError(f"lora_scope must be one of {LORA_SCOPES}, got {lora_scope!r}")
    return lora_scope


def lora_target_modules(double_blocks: Iterable[int], single_blocks: Iterable[int]) -> list[str]:
    """Full module names (relative to the transformer) of the attention projections to adapt."""
    names = [f"transformer_blocks.{i}.attn.{t}" for i in double_blocks for t in DOUBLE_TARGETS]
    names += [f"single_transformer_blocks.{i}.attn.{t}" for i in single_blocks for t in SINGLE_TARGETS]
    return names


def add_lora(backbone: nn.Module, targets: list[str], rank: int, alpha: float | None) -> None:
    """Inject a peft LoRA adapter named ``ADAPTER_NAME`` (A random, B zero: an exact no-op at init)."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        init_lora_weights=True,
        target_modules=targets,
        lora_dropout=0.0,
    )
    backbone.add_adapter(config, adapter_name=ADAPTER_NAME)


def is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def lora_parameters(backbone: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in backbone.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def base_linear(module: nn.Module, x: Tensor) -> Tensor:
    """The frozen projection only, whether or not a LoRA adapter wraps it."""
    if is_lora_layer(module):
        return module.base_layer(x)
    return module(x)


def lora_delta(module: nn.Module, x: Tensor) -> Tensor | None:
    """The active adapters' contribution B(A(x))·scaling, or None when ``module`` has no active LoRA."""
    if not is_lora_layer(module) or module.disable_adapters or module.merged:
        return None
    out = None
    for name in module.active_adapters:
        if name not in module.lora_A.keys():
            continue
        a, b = module.lora_A[name], module.lora_B[name]
        d = b(a(module.lora_dropout[name](x.to(a.weight.dtype)))) * module.scaling[name]
        out = d if out is None else out + d
    return None if out is None else out.to(x.dtype)


def project(module: nn.Module, x: Tensor, with_lora: bool) -> Tensor:
    """``module(x)`` with (``with_lora``) or without the adapter."""
    if with_lora:
        return module(x)
    return base_linear(module, x)


def add_delta(base: Tensor, module: nn.Module, x: Tensor) -> Tensor:
    """``base`` (= base_linear(module, x)) plus the LoRA delta on ``x`` when there is one."""
    d = lora_delta(module, x)
    return base if d is None else base + d


def lora_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(backbone, adapter_name=ADAPTER_NAME)


def lora_metadata(backbone: nn.Module) -> dict | None:
    """The adapter's shape as diffusers records it beside LoRA weights (rank, alpha, target modules),
    so a loader rebuilds it with the trained scale alpha / r; None without an adapter."""
    config = getattr(backbone, "peft_config", {}).get(ADAPTER_NAME)
    if config is None:
        return None
    # rank_pattern and alpha_pattern (empty: one rank and alpha everywhere) are read unconditionally by
    # diffusers 0.35's loader, which fails on metadata without them
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules),
            "rank_pattern": {}, "alpha_pattern": {}}
