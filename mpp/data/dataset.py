"""Reading prepared samples, validating each one, and padding instances into batches."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset, get_worker_info

from mpp.data.layout import read_tensors, sample_path


@dataclass
class BadRecord:
    id: str
    reason: str


class PreparedDataset(Dataset):
    """Map-style dataset over manifest records. A record that fails validation comes back as a
    `BadRecord` (never raises), so the collate function can drop and report it.

    Args:
        shapes: the shape each embedding must have (`mpp.encoders.stored_shapes`), or None.
        dtype: the dtype every stored tensor must have (prepare.json's store_dtype), or None
            (then any floating-point dtype).
    """

    def __init__(self, root: str, records: list[dict], *, shapes: dict[str, tuple[int, ...]] | None = None,
                 dtype: torch.dtype | None = None):
        self.root = root
        self.records = records
        self.shapes, self.dtype = shapes, dtype

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict | BadRecord:
        record = self.records[i]
        try:
            return self._load(record)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
            return BadRecord(record["id"], f"{type(e).__name__}: {e}")

    def _load(self, record: dict) -> dict:
        sid = record["id"]
        with open(sample_path(self.root, "caption", sid)) as f:
            caption = json.load(f)
        if not (isinstance(caption, dict) and isinstance(caption.get("instances"), list)
                and all(isinstance(i, dict) and "bbox" in i for i in caption["instances"])):
            raise ValueError(f"caption JSON must be an object whose 'instances' is a list of objects with a 'bbox', "
                             f"got {type(caption).__name__}")
        latents = read_tensors(sample_path(self.root, "latents", sid))["latents"]
        clip = read_tensors(sample_path(self.root, "clip", sid))["embeds"]
        dino = read_tensors(sample_path(self.root, "dino", sid))["embeds"]
        text = read_tensors(sample_path(self.root, "text", sid))
        n = record["num_instances"]
        for k, inst in enumerate(caption["instances"]):
            bbox = inst["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
                raise ValueError(f"instance {k} bbox must be 4 numbers, got {bbox!r}")
        boxes = torch.tensor([inst["bbox"] for inst in caption["instances"]], dtype=torch.float32).reshape(-1, 4)
        fg = instance_roles(caption["instances"])
        sample = {
            "id": sid, "latents": latents, "boxes": boxes, "foreground": fg,
            "clip_embeds": clip, "dino_embeds": dino, "instance_text": text["instance_embeds"],
            "prompt_embeds": text["prompt_embeds"], "pooled_prompt_embeds": text["pooled_prompt_embeds"],
        }
        validate_sample(sample, n=n, latent_shape=record["latent_shape"], shapes=self.shapes, dtype=self.dtype)
        # generation gives an instance without a reference image no image embeddings (the model's null
        # ones stand in); preparation embedded such an instance's own crop, which training shows only
        # where the crop is the instance's identity (a foreground self-reference)
        cropped = torch.tensor([not inst.get("reference") for inst in caption["instances"]], dtype=torch.bool)
        no_image = (cropped & (fg != 1))[:, None]
        for key in ("clip_embeds", "dino_embeds"):
            sample[key] = sample[key].masked_fill(no_image, 0.0)
        return sample


def instance_roles(instances: list[dict]) -> Tensor:
    """Each instance's role for α and the identity loss: its `foreground` flag where the data has
    one; otherwise 1 (foreground) when it has a reference image, −1 (unknown) when not."""
    return torch.tensor([float(inst["foreground"]) if inst.get("foreground") is not None
                         else (1.0 if inst.get("reference") else -1.0) for inst in instances], dtype=torch.float32)


def validate_sample(sample: dict, *, n: int, latent_shape: list[int], shapes: dict[str, tuple[int, ...]] | None = None,
                    dtype: torch.dtype | None = None) -> None:
    """Raises ValueError naming what disagrees: dtypes (floating point; `dtype` when given), shapes
    versus N, the latent grid and the model's widths (`shapes`), boxes outside [0, 1] or without
    area, non-finite values (before any masking hides them: a damaged record is named, never trained on)."""
    for key, value in sample.items():
        if isinstance(value, Tensor) and key not in ("boxes", "foreground") and (
                not value.is_floating_point() or (dtype is not None and value.dtype != dtype)):
            raise ValueError(f"{key} is {value.dtype}, the dataset stores {dtype or 'floating point'}")
        if isinstance(value, Tensor) and value.is_floating_point() and not _all_finite([value]):
            raise ValueError(f"{key} holds non-finite values")
    for key, shape in (shapes or {}).items():
        got = tuple(sample[key].shape[1:] if key in _PADDED else sample[key].shape)
        if got != tuple(shape):
            raise ValueError(f"{key} has shape {list(sample[key].shape)}; the model's encoders need "
                             f"{'N×' if key in _PADDED else ''}{'×'.join(map(str, shape))}")
    if list(sample["latents"].shape) != list(latent_shape):
        raise ValueError(f"latents have shape {list(sample['latents'].shape)}, manifest says {latent_shape}")
    for key in ("boxes", "clip_embeds", "dino_embeds", "instance_text", "foreground"):
        if sample[key].shape[0] != n:
            raise ValueError(f"{key} has {sample[key].shape[0]} rows, manifest says {n} instances")
    boxes = sample["boxes"].tolist()  # a few boxes: plain Python beats a tensor op per test
    if not all(0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 for x0, y0, x1, y1 in boxes):
        raise ValueError(f"boxes must lie in [0, 1] with positive area, got {boxes}")


_PADDED = ("boxes", "clip_embeds", "dino_embeds", "instance_text", "foreground")


def collate(items: list[dict | BadRecord]) -> dict:
    """Stacks good samples, pads instances to the batch maximum with `instance_mask`, and passes
    the bad records (including any with non-finite values, found as they were loaded) on under
    "bad" for the DataModule to count. Tensors keep their stored dtype; the DataModule casts them on the device."""
    good = [x for x in items if not isinstance(x, BadRecord)]
    bad = [x for x in items if isinstance(x, BadRecord)]
    batch = _stack(good)  # finite: each sample was checked as it was loaded (validate_sample)
    batch["bad"] = bad
    return batch


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every value is finite. A sum is NaN or infinite when some value is, and one reduction
    in the stored dtype is far cheaper than an elementwise test; only a sum that overflowed (or a
    tensor that really holds a non-finite value) is tested element by element."""
    return all(bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()) for t in tensors)


def _stack(good: list[dict]) -> dict:
    batch: dict = {"ids": [x["id"] for x in good]}
    if not good:
        return batch
    counts = torch.tensor([x["boxes"].shape[0] for x in good])
    batch["instance_mask"] = torch.arange(int(counts.max()))[None] < counts[:, None]
    for key in _PADDED:
        batch[key] = pad_sequence([x[key] for x in good], batch_first=True)
    for key in ("latents", "prompt_embeds", "pooled_prompt_embeds"):
        batch[key] = torch.stack([x[key] for x in good])
    return batch


def pack(batch: dict) -> dict:
    """Moves every tensor of a batch into one byte buffer (8-byte aligned) so a DataLoader worker
    hands the main process one shared-memory block per batch instead of one per tensor: with
    small tensors the per-tensor transfer, not the reading, limits throughput."""
    tensors = {k: v.contiguous() for k, v in batch.items() if isinstance(v, Tensor)}
    layout, offset = [], 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        layout.append((key, t.dtype, tuple(t.shape), offset, nbytes))
        offset += -(-nbytes // 8) * 8
    if get_worker_info() is not None:
        # allocated in shared memory, where the batch travels (as torch's default_collate does in a
        # worker): sending it then copies nothing, where moving a private buffer there copies it again
        buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(offset))
    else:
        buffer = torch.empty(offset, dtype=torch.uint8)
    for key, _, _, start, nbytes in layout:
        buffer[start : start + nbytes] = tensors[key].reshape(-1).view(torch.uint8)
    rest = {k: v for k, v in batch.items() if k not in tensors}
    return {**rest, "_packed": (buffer, layout)}


def unpack(batch: dict) -> dict:
    """Inverse of `pack`: zero-copy views into the buffer."""
    if "_packed" not in batch:
        return batch
    buffer, layout = batch.pop("_packed")
    for key, dtype, shape, start, nbytes in layout:
        batch[key] = buffer[start : start + nbytes].view(dtype).view(shape)
    return batch


def packed_collate(items: list[dict | BadRecord]) -> dict:
    return pack(collate(items))
