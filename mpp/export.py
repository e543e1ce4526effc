"""The export format: what training leaves for use without Lightning, written and read here.

An export folder holds the LoRA (absent without one), `heads.safetensors` (mpp's heads) and
`config.json` (an `ExportConfig`: what it takes to rebuild the model and sample as training did, its
local paths absolute, so it reads the same from any working directory).

The LoRA's scale alpha / r is folded into its `lora_B` weights, and its adapter metadata says
alpha = r: a loader that reads alpha from the metadata (diffusers), one that looks for per-key
`.alpha` tensors and finds none (ComfyUI), and one that applies B·A as it is all apply the trained
delta. `config.json` records the folded factor (`lora_scale_folded`), which `load_exported` takes
back out, since mpp rebuilds the adapter at its trained alpha. The file's name and keys say where
it acts:
- `lora.safetensors` (`heads.lora_scope: all`): diffusers' format (`transformer.<module>.lora_A/B`);
  it adapts the backbone everywhere, so it is also a plain FLUX LoRA (`FluxPipeline.load_lora_weights`),
  though only mpp's heads give it the layout;
- `lora_layout_branch.safetensors` (`heads.lora_scope: layout`): it was trained only inside mpp's
  Assemble-Attn branch, and a plain loader would apply it to every token of those blocks, which it
  never learned. Its keys are `mpp_layout_branch.<module>.A/B.weight`, which no plain loader takes
  for a LoRA (diffusers refuses the file, ComfyUI reports each key as not loaded); only
  `load_exported` uses it, as trained.
- `lora_kohya.safetensors` (optional, `lora_scope: all` only): the same LoRA in the kohya format
  (`mpp.export_kohya`), for the loaders that read FLUX LoRAs by BFL's module names.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from safetensors.torch import load_file, save_file
from torch import Tensor

from mpp.encoders import EncoderSettings, embedding_dims, parse_dtype
from mpp.export_kohya import KOHYA_NAME, write_kohya
from mpp.nn import HeadsConfig, MppFlux, build_backbone
from mpp.nn.lora import ADAPTER_NAME
from mpp.sampling import SamplingConfig

LORA_NAMES = {"all": "lora.safetensors", "layout": "lora_layout_branch.safetensors"}
HEADS_NAME, CONFIG_NAME = "heads.safetensors", "config.json"
LAYOUT_PREFIX = "mpp_layout_branch."
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps a LoRA's shape in the file


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
    lora_scale_folded: float = 1.0  # the factor the file's lora_B carries (exports before folding: 1)

    @classmethod
    def from_dict(cls, d: dict) -> ExportConfig:
        return cls(**{**d, "heads": HeadsConfig(**d["heads"]), "encoders": EncoderSettings(**d["encoders"]),
                      "sampling": SamplingConfig(**d["sampling"])})


def fold_lora_scale(lora: dict[str, Tensor], metadata: dict | None) -> tuple[dict[str, Tensor], dict | None, float]:
    """`lora` (peft names) with alpha / r folded into each lora_B, the metadata saying alpha = r, and
    the folded factor."""
    if metadata is None:
        return lora, None, 1.0
    scale = float(metadata["lora_alpha"]) / float(metadata["r"])
    folded = {k: (v * scale).to(v.dtype) if ".lora_B." in k else v for k, v in lora.items()}
    return folded, {**metadata, "lora_alpha": float(metadata["r"])}, scale


def _layout_key(peft_name: str) -> str:
    return LAYOUT_PREFIX + peft_name.replace(".lora_A.", ".A.").replace(".lora_B.", ".B.")


def _peft_key(layout_key: str) -> str:
    return layout_key.removeprefix(LAYOUT_PREFIX).replace(".A.weight", ".lora_A.weight").replace(".B.weight",
                                                                                              ".lora_B.weight")


def write_lora(dirpath: str, lora: dict[str, Tensor], lora_scope: str, metadata: dict | None) -> str:
    """Writes the LoRA `lora` (peft's names relative to the transformer, scale folded) as the file of
    `lora_scope` (module docstring); returns its path."""
    # imported here: FluxPipeline loads transformers' image processors, which cost seconds (and a warning
    # without torchvision) that every other use of this module would pay
    from diffusers import FluxPipeline

    name = LORA_NAMES[lora_scope]
    if lora_scope == "all":
        FluxPipeline.save_lora_weights(dirpath, transformer_lora_layers=lora, weight_name=name,
                                       transformer_lora_adapter_metadata=metadata)
    else:
        save_file({_layout_key(k): v for k, v in lora.items()}, os.path.join(dirpath, name),
                  metadata={"format": "mpp_layout_branch", ADAPTER_METADATA_KEY: json.dumps(metadata)})
    return os.path.join(dirpath, name)


def read_lora(path: str, lora_scope: str) -> dict[str, Tensor]:
    """The LoRA file of `lora_scope` as peft's names relative to the transformer (scale still folded)."""
    weights = load_file(path)
    if lora_scope == "all":
        return {k.removeprefix("transformer."): v for k, v in weights.items()}
    if any(k.startswith("transformer.") for k in weights):  # written before the layout branch had its prefix
        return {k.removeprefix("transformer."): v for k, v in weights.items()}
    return {_peft_key(k): v for k, v in weights.items()}


def check_kohya(kohya: bool, lora_scope: str, flag: str) -> None:
    """A kohya file is a plain FLUX LoRA: only a LoRA trained on every token (`lora_scope: all`) is one."""
    if kohya and lora_scope != "all":
        raise ValueError(f"{flag}: a kohya file is applied to every token by its loaders, and this model's LoRA "
                         f"(heads.lora_scope: {lora_scope}) was trained only inside mpp's layout branch; "
                         "train with --model.heads.lora_scope=all for a plain FLUX LoRA")


def write_export(dirpath: str, weights: dict[str, Tensor], config: ExportConfig,
                 lora_metadata: dict | None = None, *, kohya: bool = False) -> None:
    """Writes an export of the mpp weights `weights` (MppFlux's state-dict names: heads and LoRA, no
    frozen backbone weight) and `config` to `dirpath`; `lora_metadata` (`mpp.nn.lora.lora_metadata`:
    the adapter's rank and trained alpha) gives the scale folded into the LoRA file. `kohya`: also
    the LoRA in the kohya format (`mpp.export_kohya`; `lora_scope: all` only)."""
    check_kohya(kohya, config.heads.lora_scope, "kohya")
    os.makedirs(dirpath, exist_ok=True)
    # peft's saved names: relative to the transformer, without the adapter's name
    lora = {k.removeprefix("backbone.").replace(f".{ADAPTER_NAME}.", "."): v.detach().cpu().contiguous()
            for k, v in sorted(weights.items()) if ".lora_" in k}
    scale = 1.0
    if lora:
        lora, metadata, scale = fold_lora_scale(lora, lora_metadata)
        write_lora(dirpath, lora, config.heads.lora_scope, metadata)
        if kohya:
            write_kohya(os.path.join(dirpath, KOHYA_NAME), lora)
    heads = {k: v.detach().cpu().contiguous() for k, v in sorted(weights.items()) if ".lora_" not in k}
    save_file(heads, os.path.join(dirpath, HEADS_NAME), metadata={"stage": str(config.stage)})
    portable = asdict(config)
    portable["lora_scale_folded"] = scale
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

        lora = {k: v / cfg.lora_scale_folded if ".lora_B." in k else v
                for k, v in read_lora(lora_path, cfg.heads.lora_scope).items()}
        result = set_peft_model_state_dict(bb, lora, adapter_name=ADAPTER_NAME)
        if result.unexpected_keys:
            raise ValueError(f"{lora_path} holds weights the model lacks, e.g. {result.unexpected_keys[:5]}")
    return model.to(device).eval(), cfg
