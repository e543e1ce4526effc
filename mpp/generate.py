"""Generation from layouts: JSONL in, PNGs (with and without box overlays) and a JSON report out.

    python -m mpp.generate --config configs/stage1.yaml [--config configs/toy.yaml] \\
        --ckpt runs/checkpoints/stage1/step=0000600.ckpt --layouts layouts.jsonl --out generated/

or through Lightning, with the same sampling code (``MppModule.predict_step``, ``LayoutWriter``)::

    python main.py predict --config configs/stage1.yaml --ckpt_path ... --data.predict_file layouts.jsonl

From Python, without Lightning, on what training exported:

    model, settings, sampler = load_exported("runs/export/stage1")
    layouts, errors = read_layouts("layouts.jsonl", resolution=1024)
    generate(model, Encoders(settings), layouts, "generated/", resolution=1024, sampler=sampler)

Each JSONL line: {"id": "shot_12"?, "prompt": "...", "instances": [{"bbox": [x0, y0, x1, y1],
"caption": "...", "reference": "refs/actor.png"?}]}. Boxes whose values all lie in [0, 1] are
normalized; otherwise they are pixels of the generated image (data.resolution square). A bad line
is reported with its number and skipped; the good ones are still generated.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mpp.data.dataset import CONDITIONING
from mpp.data.raw import read_image, to_tensor
from mpp.encoders import EncoderSettings, Encoders, crop_boxes, embedding_dims, parse_dtype
from mpp.filenames import is_safe_stem, safe_stem
from mpp.flow import euler_sample
from mpp.viz import draw_boxes, to_uint8


log = logging.getLogger(__name__)


@dataclass
class Layout:
    id: str
    prompt: str
    boxes: Tensor  # N×4 normalized xyxy
    captions: list[str]
    references: list[Tensor | None]  # 3×h×w in [-1, 1]
    name: str = ""  # file name stem of its images (mpp.filenames.safe_stem of the id when empty)

    def __post_init__(self):
        self.name = self.name or safe_stem(self.id, "layout")


def _parse_line(line: str, number: int, *, resolution: int, root: str) -> Layout:
    data = json.loads(line)
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
        raise ValueError("needs a string field 'prompt'")
    instances = data.get("instances")
    if not isinstance(instances, list) or not instances:
        raise ValueError("needs a non-empty list 'instances' of boxes")
    boxes, captions, refs = [], [], []
    for k, inst in enumerate(instances):
        bbox = inst.get("bbox") if isinstance(inst, dict) else None
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise ValueError(f"instance {k} needs a 'bbox' of 4 numbers, got {bbox!r}")
        box = [float(v) for v in bbox]
        if not all(math.isfinite(v) for v in box):
            raise ValueError(f"instance {k} bbox {bbox} is not finite")
        if any(v > 1 for v in box):
            box = [v / resolution for v in box]
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"instance {k} bbox {bbox} has zero area")
        if min(box) < 0 or max(box) > 1:
            raise ValueError(f"instance {k} bbox {bbox} lies outside the {resolution}×{resolution} image")
        ref = inst.get("reference")
        if ref is not None:
            path = os.path.join(root, ref)
            if not os.path.exists(path):
                raise ValueError(f"instance {k} reference {path} does not exist")
            ref = to_tensor(read_image(path, str(number)))
        boxes.append(box)
        captions.append(str(inst.get("caption", "")))
        refs.append(ref)
    fallback = f"line{number:05d}"
    sid = str(data["id"]) if data.get("id") not in (None, "") else fallback
    return Layout(id=sid, prompt=data["prompt"], boxes=torch.tensor(boxes), captions=captions, references=refs,
                  name=safe_stem(sid, fallback))


def read_layouts(path: str, *, resolution: int) -> tuple[list[Layout], list[str]]:
    """Parses a layouts JSONL; returns the good layouts and one message per bad line ("FILE:N: ...").
    Reference paths are relative to the JSONL's folder. Each id becomes a safe file name
    (`Layout.name`); a line whose file name an earlier line already has is a bad line."""
    layouts, errors, first = [], [], {}
    root = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                layout = _parse_line(line, number, resolution=resolution, root=root)
            except (ValueError, json.JSONDecodeError) as e:
                errors.append(f"{path}:{number}: {e}")
                continue
            if layout.name.lower() in first:  # case-insensitive file systems would overwrite it too
                errors.append(f"{path}:{number}: id {layout.id!r} (file name {layout.name}) repeats line "
                              f"{first[layout.name.lower()]}'s; ids must be unique")
                continue
            first[layout.name.lower()] = number
            layouts.append(layout)
    return layouts, errors


@torch.no_grad()
def encode_layout(encoders: Encoders, layout: Layout) -> dict:
    """The conditioning of one layout as a batch of one. An instance without a reference gets zero
    image embeddings: the model's learned null embedding stands in for them."""
    prompt, pooled = encoders.encode_prompts([layout.prompt])
    n = len(layout.captions)
    dims = (encoders.clip_vision.config.projection_dim, encoders.dino.config.hidden_size)
    clip = torch.zeros(n, dims[0], device=encoders.device)
    dino = torch.zeros(n, dims[1], device=encoders.device)
    size = max(encoders.clip_size, encoders.dino_size)
    full = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    for k, ref in enumerate(layout.references):
        if ref is not None:
            crop = crop_boxes(ref[None], full, size=size)[0]
            clip[k] = encoders.clip_image_embeds(crop)[0].float()
            dino[k] = encoders.dino_embeds(crop)[0].float()
    dev = encoders.device
    return {
        "ids": [layout.id], "prompt_embeds": prompt.float(), "pooled_prompt_embeds": pooled.float(),
        "boxes": layout.boxes[None].to(dev), "instance_mask": torch.ones(1, n, dtype=torch.bool, device=dev),
        "instance_text": encoders.encode_texts_pooled(layout.captions)[None].float(),
        "clip_embeds": clip[None], "dino_embeds": dino[None],
    }


@dataclass
class Sampler:
    """How to sample: Euler steps, timestep shift, the guidance value fed to FLUX-dev, base seed, and
    the layout guidance scale (1: off)."""

    steps: int = 28
    shift: float | None = 3.0
    guidance: float = 3.5
    seed: int = 0
    layout_guidance: float = 1.0


@torch.no_grad()
def sample_latents(model, batch: dict, noise: Tensor, *, steps: int, shift: float | None, guidance: float,
                   layout_guidance: float = 1.0) -> Tensor:
    """Euler-integrates `model` (an `mpp.nn.MppFlux`) from `noise` for the layouts of `batch`.

    `layout_guidance` s ≠ 1 is classifier-free guidance on the layout: v = v₀ + s·(v − v₀), where v₀
    is the same model with every instance masked out, which is exactly the backbone (plus LoRA
    where scoped) without mpp's heads. Both run as one batch of twice the size.
    """
    cond = {k: batch[k] for k in CONDITIONING}
    if layout_guidance != 1.0:
        cond = {k: torch.cat([v, v]) for k, v in cond.items()}
        n = len(noise)
        cond["instance_mask"] = torch.cat([batch["instance_mask"], torch.zeros_like(batch["instance_mask"])])

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        if layout_guidance == 1.0:
            return model(latents=x, timesteps=t, guidance=torch.full_like(t, guidance), **cond).velocity
        t2 = torch.cat([t, t])
        v, v0 = model(latents=torch.cat([x, x]), timesteps=t2, guidance=torch.full_like(t2, guidance),
                      **cond).velocity.split(n)
        return v0 + layout_guidance * (v - v0)

    return euler_sample(velocity, noise, steps=steps, shift=shift)


@torch.no_grad()
def generate_one(model, encoders: Encoders, layout: Layout, *, resolution: int, sampler: Sampler,
                 index: int) -> tuple[np.ndarray, Tensor, int]:
    """Samples one layout with `model` (an `mpp.nn.MppFlux`) from seed `sampler.seed + index`.
    Returns the image (H×W×3 uint8), the predicted α per instance and the seed."""
    device = next(model.parameters()).device
    shape = (1, model.backbone.config.in_channels // 4, resolution // encoders.vae_downsample,
             resolution // encoders.vae_downsample)
    model.eval()
    batch = encode_layout(encoders, layout)
    seed = sampler.seed + index
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    alpha = model.instance_alpha(batch["boxes"], batch["instance_mask"], batch["clip_embeds"], batch["dino_embeds"],
                                 batch["instance_text"])[0]
    latents = sample_latents(model, batch, noise, steps=sampler.steps, shift=sampler.shift,
                             guidance=sampler.guidance, layout_guidance=sampler.layout_guidance)
    return to_uint8(encoders.decode_latents(latents)[0]), alpha.cpu(), seed


def save_generated(pixels: np.ndarray, alpha: Tensor, layout: Layout, seed: int, out_dir: str) -> dict:
    """Writes `<name>.png` and `<name>_boxes.png` (boxes coloured by α; `name` the layout's safe file
    name) to `out_dir`; returns the record that `generated.json` lists."""
    if not is_safe_stem(layout.name):
        raise ValueError(f"layout {layout.id!r}: file name {layout.name!r} is not a plain file name")
    os.makedirs(out_dir, exist_ok=True)
    boxes = layout.boxes.cpu()
    Image.fromarray(pixels).save(os.path.join(out_dir, f"{layout.name}.png"))
    Image.fromarray(draw_boxes(pixels, boxes, alpha)).save(os.path.join(out_dir, f"{layout.name}_boxes.png"))
    return {"id": layout.id, "prompt": layout.prompt, "seed": seed, "boxes": boxes.tolist(),
            "captions": layout.captions, "alpha": [round(float(a), 4) for a in alpha],
            "image": f"{layout.name}.png", "image_with_boxes": f"{layout.name}_boxes.png"}


def write_report(out_dir: str, records: list[dict], *, checkpoint: str, layouts: str,
                 errors: list[str] | None = None) -> None:
    """Writes `<out_dir>/generated.json`: the checkpoint, the layouts file, one record per image and the
    layouts file's bad lines (what `mpp evaluate` reads back)."""
    report = {"checkpoint": checkpoint, "layouts": layouts, "images": records, "errors": errors or []}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "generated.json"), "w") as f:
        json.dump(report, f, indent=1)


def generate(model, encoders: Encoders, layouts: list[Layout], out_dir: str, *, resolution: int,
             sampler: Sampler, records: list[dict] | None = None) -> list[dict]:
    """Samples each layout with `model` (an `mpp.nn.MppFlux`, no Lightning needed), writes
    `<name>.png` and `<name>_boxes.png` (boxes coloured by the predicted α), returns one record each
    (appended to `records` as each image is written, when given)."""
    records = [] if records is None else records
    for i, layout in enumerate(layouts):
        pixels, alpha, seed = generate_one(model, encoders, layout, resolution=resolution, sampler=sampler, index=i)
        records.append(save_generated(pixels, alpha, layout, seed, out_dir))
    return records


def load_exported(export_dir: str, *, backbone: str | None = None, device: str = "cpu"):
    """Rebuilds the trained model from an export folder (`config.json`, `heads.safetensors`,
    `lora.safetensors`) without Lightning. Returns (MppFlux, EncoderSettings, Sampler).

    Args:
        backbone: the FLUX transformer's hub id or folder, if not the one recorded at export.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from mpp.nn import MppFlux, build_backbone
    from mpp.nn.lora import ADAPTER_NAME

    with open(os.path.join(export_dir, "config.json")) as f:
        cfg = json.load(f)
    settings = EncoderSettings(**cfg["encoders"])
    bb = build_backbone(backbone or cfg["backbone"], subfolder=cfg["backbone_subfolder"],
                        torch_dtype=parse_dtype(cfg["backbone_dtype"]))
    model = MppFlux(bb, **embedding_dims(settings), **cfg["heads"])
    heads = load_file(os.path.join(export_dir, "heads.safetensors"))
    own = {n for n, _ in model.named_parameters() if ".lora_" not in n and not n.startswith("backbone.")}
    missing = sorted(own - set(heads))
    if missing:
        raise ValueError(f"{export_dir}/heads.safetensors lacks {len(missing)} weights, e.g. {missing[:5]}")
    model.load_state_dict(heads, strict=False)
    lora_path = os.path.join(export_dir, "lora.safetensors")
    if os.path.exists(lora_path):
        lora = {k.removeprefix("transformer."): v for k, v in load_file(lora_path).items()}
        result = set_peft_model_state_dict(bb, lora, adapter_name=ADAPTER_NAME)
        if result.unexpected_keys:
            raise ValueError(f"{lora_path} holds weights the model lacks, e.g. {result.unexpected_keys[:5]}")
    sampler = Sampler(steps=cfg["sampling"]["steps"], shift=cfg["sampling"]["shift"], guidance=cfg["guidance"],
                      seed=cfg["sampling"]["seed"], layout_guidance=cfg["sampling"].get("layout_guidance", 1.0))
    return model.to(device).eval(), settings, sampler


def load_module(configs: list[str], ckpt: str, overrides: list[str] | None = None):
    """Builds the MppModule a config describes and loads a checkpoint's weights into it."""
    from mpp.checkpoints import load_checkpoint
    from mpp.cli import MppCLI
    from mpp.datamodule import MppDataModule
    from mpp.lit_module import MppModule

    args = [a for c in configs for a in ("--config", c)] + list(overrides or [])
    cli = MppCLI(MppModule, MppDataModule, run=False, args=args)
    module = cli.model
    module.configure_model()
    state = load_checkpoint(ckpt)["state_dict"]
    missing = sorted(module.owned_keys() - set(state))
    if missing:
        raise ValueError(f"{ckpt} lacks {len(missing)} of the model's weights, e.g. {missing[:5]}")
    module.load_state_dict(state, strict=False)
    return module, cli.datamodule.resolution


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mpp generate", description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", required=True, help="stage config and overlays, in order")
    p.add_argument("--ckpt", required=True, help="a training checkpoint of that stage")
    p.add_argument("--layouts", required=True, help="JSONL of layouts")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: model.sampling.steps)")
    a, overrides = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module, resolution = load_module(a.config, a.ckpt, overrides)
    layouts, errors = read_layouts(a.layouts, resolution=resolution)
    for e in errors:
        log.error("skipping %s", e)
    sampler = module.sampler(steps=a.steps or module.sampling.steps, seed=a.seed)
    records: list[dict] = []
    try:
        generate(module.model, module.encoders, layouts, a.out, resolution=resolution, sampler=sampler, records=records)
    except BaseException as e:
        errors.append(f"stopped after {len(records)} of {len(layouts)} layouts: {type(e).__name__}: {e}")
        raise
    finally:  # the report lists what was written, whatever happened
        write_report(a.out, records, checkpoint=a.ckpt, layouts=a.layouts, errors=errors)
    log.info("wrote %d images to %s (%d bad lines skipped)", len(records), a.out, len(errors))
    return 1 if errors and not records else 0


if __name__ == "__main__":
    raise SystemExit(main())
