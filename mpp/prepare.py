"""Dataset preparation: raw folder → latents, embeddings and a manifest (the toy world's: `mpp toy prepare`).

    python -m mpp.prepare run RAW OUT --resolution 1024 [--buckets.aspect_ratios '[1, 1.7778, 2.39]']
                              [--num_shards K --shard_index I] [--encoders.flux ...]
    python -m mpp.prepare merge OUT

Each image goes to the aspect-ratio bucket nearest its own (`mpp.data.buckets`; `--buckets.aspect_ratios
'[1]'` prepares squares only); the summary at the end counts the samples per bucket and the instances
the crops clipped or dropped.

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
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mpp.data.buckets import Buckets, bucket_name, bucket_of
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
    tensors_to_bytes,
    write_manifest,
)
from mpp.data.raw import RawSample, SampleError, list_sample_ids, load_raw_sample
from mpp.encoders import EncoderSettings, Encoders, crop_boxes, parse_dtype

log = logging.getLogger(__name__)


def prepare_info(settings: EncoderSettings, resolution: int, store_dtype: str,
                 buckets: list[tuple[int, int]]) -> dict:
    """What prepare.json records (a training config must agree with all but the buckets)."""
    return {"version": FORMAT_VERSION, "resolution": resolution, "encoders": settings.identity(),
            "store_dtype": store_dtype, "buckets": [list(b) for b in buckets]}


@dataclass
class PrepareResult:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already done
    errors: list[tuple[str, str]] = field(default_factory=list)  # (id, message)
    buckets: Counter = field(default_factory=Counter)  # bucket (w, h) → samples of this shard
    instances: int = 0  # instances kept in this shard's samples
    clipped: int = 0  # of them, cut by the crop to their bucket
    dropped: int = 0  # instances that left the frame (not prepared)
    samples_with_dropped: int = 0

    def count(self, record: dict) -> None:
        self.buckets[bucket_of(record)] += 1
        self.instances += record["num_instances"]
        self.clipped += len(record.get("clipped_instances", []))
        self.dropped += len(record["dropped_instances"])
        self.samples_with_dropped += bool(record["dropped_instances"])

    def summary(self) -> str:
        """One paragraph for people: samples, buckets, and what the crops did to the instances."""
        total = sum(self.buckets.values())
        per_bucket = ", ".join(f"{bucket_name(b)}: {n}" for b, n in sorted(self.buckets.items(),
                                                                          key=lambda x: x[0][0] / x[0][1]))
        return (f"{total} samples prepared ({len(self.written)} written now, {len(self.skipped)} already done), "
                f"{len(self.errors)} bad samples skipped\n  buckets: {per_bucket or 'none'}\n"
                f"  instances: {self.instances} kept ({self.clipped} clipped by the crop), {self.dropped} dropped "
                f"because the crop left them (almost) outside the frame, in {self.samples_with_dropped} samples")


class _RawSamples(Dataset):
    def __init__(self, root: str, items: list[tuple[str, str]], resolution: int, buckets: list[tuple[int, int]],
                 require_instances: bool):
        self.root, self.items, self.resolution, self.require_instances = root, items, resolution, require_instances
        self.buckets = buckets

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> RawSample | SampleError:
        sample_id, path = self.items[i]
        try:
            return load_raw_sample(self.root, sample_id, path, resolution=self.resolution, buckets=self.buckets,
                                   require_instances=self.require_instances)
        except SampleError as e:
            return e


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


def write_sample(output: str, s: RawSample, tensors: dict, dtype: torch.dtype) -> dict:
    """Writes one prepared sample's files (image, caption, tensors as `dtype`) and returns its manifest record."""
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
    files.update({kind: tensors_to_bytes(group, dtype) for kind, group in tensors.items()})
    for kind, data in files.items():
        # a fixed temporary: the rerun of a sample whose write was killed takes over what it left
        atomic_write(sample_path(output, kind, s.id), lambda f, d=data: f.write(d), fixed_temporary=True)
    return {
        "id": s.id,
        "width": s.image.shape[2], "height": s.image.shape[1],
        "bucket": list(s.bucket),
        "source_size": list(s.source_size),
        "latent_shape": list(tensors["latents"]["latents"].shape),
        "num_instances": len(s.instance_captions),
        "dropped_instances": s.dropped,
        "clipped_instances": s.clipped,
        "files": {kind: hashlib.sha256(data).hexdigest() for kind, data in files.items()},
    }


def _claim_prepare_info(output: str, info: dict) -> None:
    existing = read_prepare_info(output)
    if existing is not None and "buckets" not in existing:  # prepared before buckets: squares only
        existing = {**existing, "buckets": [[existing.get("resolution"), existing.get("resolution")]]}
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
    buckets: Buckets | None = None,
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
        resolution: each bucket has about resolution² pixels.
        buckets: the aspect-ratio buckets (default `Buckets()`: square, 4:3, 16:9, 2.39:1 and portrait twins).
        on_error: "skip" logs a bad sample (naming its file) and goes on; "stop" raises it.
        num_workers: processes that read and validate raw samples while the encoders run.
    """
    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, num_shards={num_shards}), got {shard_index}")
    if resolution % 16:
        raise ValueError(f"resolution must be a multiple of 16 (VAE factor 8 × 2×2 patches), got {resolution}")
    sizes = (buckets or Buckets()).resolve(resolution)
    store = parse_dtype(store_dtype, "store_dtype")
    if store not in (torch.float16, torch.bfloat16):
        raise ValueError(f"store_dtype must be float16 or bfloat16, got {store_dtype!r}")
    os.makedirs(output, exist_ok=True)
    _claim_prepare_info(output, prepare_info(encoders, resolution, store_dtype, sizes))

    items = list_sample_ids(source)[shard_index::num_shards]
    manifest_path = os.path.join(output, shard_manifest_name(shard_index, num_shards))
    done: dict[str, dict] = {}
    for path in {manifest_path, os.path.join(output, "manifest.jsonl")}:
        if os.path.exists(path):
            done.update({r["id"]: r for r in read_manifest(path)})
    wanted = {sid for sid, _ in items}
    kept = [r for sid, r in sorted(done.items()) if sid in wanted and record_is_complete(output, r)]
    result = PrepareResult(skipped=[r["id"] for r in kept])
    for r in kept:
        result.count(r)
    write_manifest(manifest_path, kept)
    finished = set(result.skipped)
    todo = [it for it in items if it[0] not in finished]

    enc = Encoders(encoders, dtype=parse_dtype(compute_dtype, "compute_dtype"), device=device)
    unit = 2 * enc.vae_downsample  # a whole grid of 2×2-packed latent tokens
    off_grid = [bucket_name(b) for b in sizes if b[0] % unit or b[1] % unit]
    if off_grid:
        raise ValueError(f"--buckets: {', '.join(off_grid)} are not multiples of {unit} px (this VAE's "
                         f"downsampling {enc.vae_downsample} × 2×2 packing)")
    loader = DataLoader(_RawSamples(source, todo, resolution, sizes, require_instances), batch_size=None,
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
            record = write_sample(output, s, _encode_sample(enc, s), store)
            manifest.write(json.dumps(record, sort_keys=True) + "\n")
            manifest.flush()
            os.fsync(manifest.fileno())
            result.written.append(s.id)
            result.count(record)
            bar.set_postfix(samples_per_s=f"{len(result.written) / (time.perf_counter() - start):.2f}",
                            errors=len(result.errors))
    if result.errors:
        log.warning("%d bad samples skipped:\n%s", len(result.errors), "\n".join(m for _, m in result.errors))
    log.info("shard %d/%d: %s", shard_index, num_shards, result.summary())
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
