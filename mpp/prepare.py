"""Dataset preparation: raw folder → latents, embeddings and a manifest (the toy world's: `mpp toy prepare`).

    python -m mpp.prepare run RAW OUT --resolution 1024 [--num_shards K --shard_index I] [--encoders.flux ...]
    python -m mpp.prepare merge OUT

Resumable: a sample whose files exist and match its manifest record is skipped. A sample's
record is appended (and fsynced) only after all its files are written atomically, so a killed
run never counts a half-written sample as done. Each sample is encoded on its own, so sharded
and unsharded runs write identical files.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import save
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mpp.data.layout import (
    FORMAT_VERSION,
    atomic_write,
    atomic_write_json,
    read_manifest,
    read_prepare_info,
    record_is_complete,
    same_info_value,
    sample_path,
    shard_manifest_name,
    write_manifest,
)
from mpp.data.raw import RawSample, SampleError, list_sample_ids, load_raw_sample
from mpp.encoders import EncoderSettings, Encoders, crop_boxes, parse_dtype

log = logging.getLogger(__name__)


def prepare_info(settings: EncoderSettings, resolution: int, store_dtype: str) -> dict:
    """What prepare.json records and a training config must agree with."""
    return {"version": FORMAT_VERSION, "resolution": resolution, "encoders": settings.identity(),
            "store_dtype": store_dtype}


@dataclass
class PrepareResult:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already done
    errors: list[tuple[str, str]] = field(default_factory=list)  # (id, message)


class _RawSamples(Dataset):
    def __init__(self, root: str, items: list[tuple[str, str]], resolution: int, require_instances: bool):
        self.root, self.items, self.resolution, self.require_instances = root, items, resolution, require_instances

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> RawSample | SampleError:
        sample_id, path = self.items[i]
        try:
            return load_raw_sample(self.root, sample_id, path, resolution=self.resolution,
                                   require_instances=self.require_instances)
        except SampleError as e:
            return e


def _safetensors_bytes(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> bytes:
    return save({k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()})


@torch.no_grad()
def _encode_sample(enc: Encoders, s: RawSample) -> dict[str, dict[str, torch.Tensor]]:
    latents = enc.encode_images(s.image[None])[0]
    size = max(enc.clip_size, enc.dino_size)
    box_crops = crop_boxes(s.image[None], s.boxes[None], size=size, margin=enc.settings.crop_margin)[0]
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    crops = torch.stack([
        box_crops[k] if ref is None else crop_boxes(ref[None], full[None], size=size)[0, 0]
        for k, ref in enumerate(s.references)
    ]) if s.references else box_crops
    prompt, pooled = enc.encode_prompts([s.caption])
    return {
        "latents": {"latents": latents},
        "clip": {"embeds": enc.clip_image_embeds(crops)},
        "dino": {"embeds": enc.dino_embeds(crops)},
        "text": {"prompt_embeds": prompt[0], "pooled_prompt_embeds": pooled[0],
                 "instance_embeds": enc.encode_texts_pooled(s.instance_captions)},
    }


def _write_sample(output: str, s: RawSample, tensors: dict, dtype: torch.dtype) -> dict:
    from PIL import Image

    img = ((s.image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    png = io.BytesIO()
    Image.fromarray(img).save(png, format="PNG")
    caption = {
        "caption": s.caption,
        "num_instances": len(s.instance_captions),
        "instances": [
            {"bbox": [round(float(v), 6) for v in box], "caption": c, "foreground": fg, "reference": ref}
            for box, c, fg, ref in zip(s.boxes.tolist(), s.instance_captions, s.foreground, s.reference_paths,
                                       strict=True)
        ],
    }
    files = {"image": png.getvalue(), "caption": json.dumps(caption, indent=1).encode()}
    files.update({kind: _safetensors_bytes(group, dtype) for kind, group in tensors.items()})
    for kind, data in files.items():
        atomic_write(sample_path(output, kind, s.id), lambda f, d=data: f.write(d))
    return {
        "id": s.id,
        "width": s.image.shape[2], "height": s.image.shape[1],
        "source_size": list(s.source_size),
        "latent_shape": list(tensors["latents"]["latents"].shape),
        "num_instances": len(s.instance_captions),
        "dropped_instances": s.dropped,
        "files": {kind: hashlib.sha256(data).hexdigest() for kind, data in files.items()},
    }


def _claim_prepare_info(output: str, info: dict) -> None:
    existing = read_prepare_info(output)
    if existing is None:
        atomic_write_json(os.path.join(output, "prepare.json"), info)
    elif set(existing) != set(info) or not all(same_info_value(k, existing[k], v) for k, v in info.items()):
        raise ValueError(
            f"{os.path.join(output, 'prepare.json')} holds a dataset prepared with other settings:\n"
            f"  existing: {json.dumps(existing, sort_keys=True)}\n  requested: {json.dumps(info, sort_keys=True)}\n"
            "use a new --output folder or the same settings"
        )


def prepare_dataset(
    source: str,
    output: str,
    *,
    encoders: EncoderSettings,
    resolution: int = 1024,
    store_dtype: str = "float16",
    compute_dtype: str = "float32",
    device: str = "cpu",
    num_shards: int = 1,
    shard_index: int = 0,
    on_error: str = "skip",
    require_instances: bool = True,
    num_workers: int = 0,
    progress: bool = True,
) -> PrepareResult:
    """Prepares one shard of `source` into `output`. See the module docstring.

    Args:
        on_error: "skip" logs a bad sample (naming its file) and goes on; "stop" raises it.
        num_workers: processes that read and validate raw samples while the encoders run.
    """
    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, num_shards={num_shards}), got {shard_index}")
    if resolution % 16:
        raise ValueError(f"resolution must be a multiple of 16 (VAE factor 8 × 2×2 patches), got {resolution}")
    store = parse_dtype(store_dtype, "store_dtype")
    if store not in (torch.float16, torch.bfloat16):
        raise ValueError(f"store_dtype must be float16 or bfloat16, got {store_dtype!r}")
    os.makedirs(output, exist_ok=True)
    _claim_prepare_info(output, prepare_info(encoders, resolution, store_dtype))

    items = list_sample_ids(source)[shard_index::num_shards]
    manifest_path = os.path.join(output, shard_manifest_name(shard_index, num_shards))
    done: dict[str, dict] = {}
    for path in {manifest_path, os.path.join(output, "manifest.jsonl")}:
        if os.path.exists(path):
            done.update({r["id"]: r for r in read_manifest(path)})
    wanted = {sid for sid, _ in items}
    kept = [r for sid, r in sorted(done.items()) if sid in wanted and record_is_complete(output, r)]
    result = PrepareResult(skipped=[r["id"] for r in kept])
    write_manifest(manifest_path, kept)
    finished = set(result.skipped)
    todo = [it for it in items if it[0] not in finished]

    enc = Encoders(encoders, dtype=parse_dtype(compute_dtype, "compute_dtype"), device=device)
    loader = DataLoader(_RawSamples(source, todo, resolution, require_instances), batch_size=None,
                        num_workers=num_workers)
    start = time.perf_counter()
    bar = tqdm(loader, total=len(todo), unit="sample", disable=not progress,
               desc=f"prepare shard {shard_index}/{num_shards}")
    with open(manifest_path, "a") as manifest:
        for s in bar:
            if isinstance(s, SampleError):
                if on_error == "stop":
                    raise s
                log.warning("skipping sample %s: %s", s.sample_id, s)
                result.errors.append((s.sample_id, str(s)))
                continue
            record = _write_sample(output, s, _encode_sample(enc, s), store)
            manifest.write(json.dumps(record, sort_keys=True) + "\n")
            manifest.flush()
            os.fsync(manifest.fileno())
            result.written.append(s.id)
            bar.set_postfix(samples_per_s=f"{len(result.written) / (time.perf_counter() - start):.2f}",
                            errors=len(result.errors))
    if result.errors:
        log.warning("%d bad samples skipped:\n%s", len(result.errors), "\n".join(m for _, m in result.errors))
    return result


def merge_shards(output: str) -> int:
    """Merges manifest.shard-*.jsonl (and an existing manifest.jsonl) into one manifest.jsonl sorted by id."""
    paths = sorted(glob.glob(os.path.join(output, "manifest.shard-*.jsonl")))
    if not paths:
        raise ValueError(f"{output}: no manifest.shard-*.jsonl to merge")
    records: dict[str, dict] = {}
    main_path = os.path.join(output, "manifest.jsonl")
    for path in ([main_path] if os.path.exists(main_path) else []) + paths:
        records.update({r["id"]: r for r in read_manifest(path)})
    write_manifest(main_path, [records[k] for k in sorted(records)])
    for path in paths:
        os.unlink(path)
    return len(records)


def main(args: list[str] | None = None) -> None:
    from jsonargparse import auto_cli

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    auto_cli({"run": prepare_dataset, "merge": merge_shards}, args=args, prog="mpp prepare")


if __name__ == "__main__":
    main()
