"""The export format: what training leaves for use without Lightning, written and read here.

An export folder holds the LoRA (absent without one), `heads.safetensors` (mpp's heads) and
`config.json` (an `ExportConfig`: what it takes to rebuild the model and sample as training did, its
local paths absolute, so it reads the same from any working directory).

The LoRA is in diffusers' format with its rank and alpha in the file's adapter metadata, under a name
that says where it acts:
- `lora.safetensors` (`heads.lora_scope: all`): it adapts the backbone everywhere, so it is also a
  plain FLUX LoRA (`FluxPipeline.load_lora_weights`), though only mpp's heads give it the layout;
- `lora_layout_branch.safetensors` (`heads.lora_scope: layout`): it was trained only inside mpp's
  Assemble-Attn branch, and a plain pipeline would apply it to every token of those blocks, which
  it never learned; only `load_exported` uses it as trained.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from safetensors.torch import load_file, save_file
from torch import Tensor

from mpp.encoders import EncoderSettings, embedding_dims, parse_dtype
from mpp.nn import HeadsConfig, MppFlux, build_backbone
from mpp.nn.lora import ADAPTER_NAME
from mpp.sampling import SamplingConfig

LORA_NAMES = {"all": "lora.safetensors", "layout": "lora_layout_branch.safetensors"}
HEADS_NAME, CONFIG_NAME = "heads.safetensors", "config.json"


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path is not None and os.path.isdir(path) else path


@dataclass
class ExportConfig:
    """`config.json` of an export: the backbone, heads, encoders and sampling of the trained stage."""

    stage: int
    backbone: str
    backbone_subfolder: str | None
    backbone_dtype: str
    heads: HeadsConfig
    encoders: EncoderSettings
    guidance: float
    sampling: SamplingConfig

    @classmethod
    def from_dict(cls, d: dict) -> ExportConfig:
        return cls(**{**d, "heads": HeadsConfig(**d["heads"]), "encoders": EncoderSettings(**d["encoders"]),
                      "sampling": SamplingConfig(**d["sampling"])})


def write_export(dirpath: str, weights: dict[str, Tensor], config: ExportConfig,
                 lora_metadata: dict | None = None) -> None:
    """Writes an export of the mpp weights `weights` (MppFlux's state-dict names: heads and LoRA, no
    frozen backbone weight) and `config` to `dirpath`; `lora_metadata` (`mpp.nn.lora.lora_metadata`)
    goes into the LoRA file for loaders to rebuild the adapter with its trained alpha."""
    # imported here: FluxPipeline loads transformers' image processors, which cost seconds (and a warning
    # without torchvision) that every other use of this module would pay
    from diffusers import FluxPipeline

    os.makedirs(dirpath, exist_ok=True)
    # peft's saved names: relative to the transformer, without the adapter's name
    lora = {k.removeprefix("backbone.").replace(f".{ADAPTER_NAME}.", "."): v.detach().cpu().contiguous()
            for k, v in sorted(weights.items()) if ".lora_" in k}
    if lora:
        FluxPipeline.save_lora_weights(dirpath, transformer_lora_layers=lora,
                                       weight_name=LORA_NAMES[config.heads.lora_scope],
                                       transformer_lora_adapter_metadata=lora_metadata)
    heads = {k: v.detach().cpu().contiguous() for k, v in sorted(weights.items()) if ".lora_" not in k}
    save_file(heads, os.path.join(dirpath, HEADS_NAME), metadata={"stage": str(config.stage)})
    portable = asdict(config)
    portable["backbone"] = _absolute(config.backbone)
    for key in ("flux", "clip_vision", "dino"):
        portable["encoders"][key] = _absolute(portable["encoders"][key])
    with open(os.path.join(dirpath, CONFIG_NAME), "w") as f:
        json.dump(portable, f, indent=1)


def load_exported(export_dir: str, *, backbone: str | None = None, device: str = "cpu") -> tuple[MppFlux, ExportConfig]:
    """Rebuilds the trained model from an export folder without Lightning. Returns the model (in eval
    mode) and the export's config (its `encoders`, `sampling` and `guidance` sample as training did).

    Args:
        backbone: the FLUX transformer's hub id or folder, if not the one recorded at export.
    """
    with open(os.path.join(export_dir, CONFIG_NAME)) as f:
        cfg = ExportConfig.from_dict(json.load(f))
    bb = build_backbone(backbone or cfg.backbone, subfolder=cfg.backbone_subfolder,
                        torch_dtype=parse_dtype(cfg.backbone_dtype))
    model = MppFlux(bb, **embedding_dims(cfg.encoders), heads=cfg.heads)
    heads = load_file(os.path.join(export_dir, HEADS_NAME))
    own = {n for n, _ in model.named_parameters() if ".lora_" not in n and not n.startswith("backbone.")}
    missing = sorted(own - set(heads))
    if missing:
        raise ValueError(f"{export_dir}/{HEADS_NAME} lacks {len(missing)} weights, e.g. {missing[:5]}")
    model.load_state_dict(heads, strict=False)
    lora_path = os.path.join(export_dir, LORA_NAMES[cfg.heads.lora_scope])
    if os.path.exists(lora_path):
        from peft import set_peft_model_state_dict

        lora = {k.removeprefix("transformer."): v for k, v in load_file(lora_path).items()}
        result = set_peft_model_state_dict(bb, lora, adapter_name=ADAPTER_NAME)
        if result.unexpected_keys:
            raise ValueError(f"{lora_path} holds weights the model lacks, e.g. {result.unexpected_keys[:5]}")
    return model.to(device).eval(), cfg
