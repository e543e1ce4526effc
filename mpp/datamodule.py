"""The LightningDataModule over a prepared dataset (DESIGN.md section 2).

Its `data.toy` option is the one place where core code reaches into the toy world (`mpp.toy`,
otherwise a leaf that imports core): `ToyData` builds the toy dataset in `prepare_data`.
"""

from __future__ import annotations

import hashlib
import logging
import os

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from mpp.data.buckets import bucket_name, bucket_of
from mpp.data.dataset import BadRecord, PreparedDataset, packed_collate, unpack
from mpp.data.layout import FORMAT_VERSION, check_prepare_info, read_manifest, read_prepare_info
from mpp.data.sampler import BucketBatchSampler
from mpp.data.workers import worker_init
from mpp.encoders import EncoderSettings, parse_dtype, stored_shapes
from mpp.layouts import read_layouts
from mpp.toy.prepare import ToyData

log = logging.getLogger(__name__)


def _unique(records: list[dict], manifest: str) -> list[dict]:
    """One record per id (the last, which describes the files on disk, at the first one's place):
    a duplicated record would train twice per epoch."""
    last = {r["id"]: r for r in records}
    if len(last) < len(records):
        counts: dict[str, int] = {}
        for r in records:
            counts[r["id"]] = counts.get(r["id"], 0) + 1
        dups = sorted(sid for sid, c in counts.items() if c > 1)
        log.warning("%s: %d ids have more than one record; each trains once (the last record): %s%s", manifest,
                    len(dups), ", ".join(dups[:20]), " ..." if len(dups) > 20 else "")
    out, seen = [], set()
    for r in records:
        if r["id"] not in seen:
            seen.add(r["id"])
            out.append(last[r["id"]])
    return out


def is_validation(sample_id: str, fraction: float) -> bool:
    """A stable split: adding samples never moves an existing one between train and val."""
    return int(hashlib.sha1(sample_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


class MppDataModule(L.LightningDataModule):
    """Streams prepared samples: validated on load, instances padded with a mask, batched within
    aspect-ratio buckets (`mpp.data.sampler.BucketBatchSampler`), sharded across ranks, resumable
    mid-epoch.

    Args:
        root: the prepared dataset (output of `mpp.prepare`).
        encoders: the encoder settings the dataset must have been prepared with.
        resolution: the resolution the dataset must have been prepared at (its buckets have about
            resolution² pixels), and the side of a generated square when a layout gives no size.
        batch_size: samples per rank per step, all of one bucket.
        val_fraction: share of ids held out for validation (by a hash of the id).
        num_workers: DataLoader worker processes.
        pin_memory: pin batches for faster host→GPU copies.
        max_bad_records: a run stops, listing them, once more records than this failed validation
            (counted over all ranks; every rank stops at the same batch).
        seed: seed of the per-epoch shuffle.
        toy: when set, `prepare_data` builds the toy world into `root` if it is not complete.
        predict_file: the layouts JSONL that `predict` generates (`mpp.layouts`' format); its bad
            lines are logged by number, kept in `predict_errors`, and skipped.
    """

    def __init__(
        self,
        root: str = "output_data",
        *,
        encoders: EncoderSettings | None = None,
        resolution: int = 1024,
        batch_size: int = 2,
        val_fraction: float = 0.02,
        num_workers: int = 4,
        pin_memory: bool = True,
        max_bad_records: int = 100,
        seed: int = 0,
        toy: ToyData | None = None,
        predict_file: str | None = None,
    ):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.root = root
        self.encoders = encoders or EncoderSettings()
        self.resolution, self.batch_size, self.val_fraction = resolution, batch_size, val_fraction
        self.num_workers, self.pin_memory, self.max_bad_records = num_workers, pin_memory, max_bad_records
        self.seed, self.toy = seed, toy
        self.predict_file = predict_file
        self.predict_errors: list[str] = []
        self.train_records: list[dict] = []
        self.val_records: list[dict] = []
        self.bad_records: dict[str, str] = {}
        self._epoch, self._batches = 0, 0
        self._resume: dict | None = None
        self._sampler: BucketBatchSampler | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._dtype: torch.dtype | None = None

    def _predicting(self) -> bool:
        return self.trainer is not None and self.trainer.predicting

    def prepare_data(self) -> None:
        if self.toy is not None and not self._predicting():
            self.toy.prepare(self.root, self.encoders)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            return  # layouts only: no prepared dataset
        manifest = os.path.join(self.root, "manifest.jsonl")
        if not os.path.exists(manifest):
            raise ValueError(f"{manifest} does not exist: prepare the dataset first (python -m mpp.prepare), "
                             "or merge shards (python -m mpp.prepare merge)")
        check_prepare_info(self.root, {"version": FORMAT_VERSION, "resolution": self.resolution,
                                       "encoders": self.encoders.identity()})
        records = _unique(read_manifest(manifest), manifest)
        self._shapes = stored_shapes(self.encoders)
        store = (read_prepare_info(self.root) or {}).get("store_dtype")
        self._dtype = parse_dtype(store, "store_dtype") if store else None
        self.val_records = [r for r in records if is_validation(r["id"], self.val_fraction)]
        self.train_records = [r for r in records if not is_validation(r["id"], self.val_fraction)]
        if not self.train_records or not self.val_records:
            raise ValueError(f"{manifest}: {len(self.train_records)} train and {len(self.val_records)} val samples "
                             f"with data.val_fraction={self.val_fraction}; both splits need at least one")
        self._warn_small_buckets()

    def _warn_small_buckets(self) -> None:
        """Names the buckets that cannot fill one step's batch on every rank: they never train."""
        per_step = self.batch_size * self._rank_world()[1]
        counts: dict[tuple[int, int], int] = {}
        for r in self.train_records:
            counts[bucket_of(r)] = counts.get(bucket_of(r), 0) + 1
        small = {b: n for b, n in counts.items() if n < per_step}
        if small:
            log.warning("%s: buckets with fewer training samples than one step takes (%d = data.batch_size × ranks) "
                        "never train: %s", self.root, per_step,
                        ", ".join(f"{bucket_name(b)} ({n})" for b, n in sorted(small.items())))

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _loader(self, records: list[dict], shuffle: bool) -> tuple[DataLoader, BucketBatchSampler]:
        rank, world = self._rank_world()
        sampler = BucketBatchSampler([bucket_of(r) for r in records], self.batch_size, rank=rank, num_replicas=world,
                                     shuffle=shuffle, seed=self.seed)
        loader = DataLoader(self._dataset(records), batch_sampler=sampler, collate_fn=packed_collate,
                            num_workers=self.num_workers, pin_memory=self.pin_memory,
                            persistent_workers=self.num_workers > 0,
                            worker_init_fn=worker_init if self.num_workers > 0 else None)
        return loader, sampler

    def train_dataloader(self) -> DataLoader:
        loader, self._sampler = self._loader(self.train_records, shuffle=True)
        if self._resume is not None:
            self._sampler.set_epoch(self._resume["epoch"])
            self._sampler.skip(self._resume["batches"], epoch=self._resume["epoch"])
            self._epoch, self._batches = self._resume["epoch"], self._resume["batches"]
            self._resume = None
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_records, shuffle=False)[0]

    def _dataset(self, records: list[dict]) -> PreparedDataset:
        return PreparedDataset(self.root, records, shapes=self._shapes, dtype=self._dtype)

    def predict_dataloader(self) -> DataLoader:
        """One layout of `predict_file` per step, as {"index", "layout"} (its size in the layout)."""
        if not self.predict_file:
            raise ValueError("predict needs --data.predict_file: a JSONL of layouts")
        if self.trainer is not None and self.trainer.world_size > 1:
            raise ValueError("predict runs on one device: pass --trainer.devices=1 --trainer.num_nodes=1")
        layouts, self.predict_errors = read_layouts(self.predict_file, resolution=self.resolution)
        for error in self.predict_errors:
            log.error("skipping %s", error)
        if not layouts:
            raise ValueError(f"--data.predict_file {self.predict_file} has no usable layout "
                             f"({len(self.predict_errors)} bad lines)")
        items = [{"index": i, "layout": x} for i, x in enumerate(layouts)]
        return DataLoader(items, batch_size=None, shuffle=False)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self._predicting():
            return batch
        batch = unpack(batch)
        if self.trainer is not None and self.trainer.training:
            epoch = self.trainer.current_epoch
            if epoch != self._epoch:
                self._epoch, self._batches = epoch, 0
            self._batches += 1
        new = [bad for bad in batch.pop("bad") if bad.id not in self.bad_records]
        for bad in new:
            log.warning("skipping bad record %s in %s: %s", bad.id, self.root, bad.reason)
        for bad in self._all_ranks(new):
            self.bad_records[bad.id] = bad.reason
        if self.trainer is not None and self.trainer.training and not batch["ids"]:
            batch = self._placeholder()
        if len(self.bad_records) > self.max_bad_records:
            listing = "\n".join(f"  {k}: {v}" for k, v in sorted(self.bad_records.items()))
            raise RuntimeError(f"{len(self.bad_records)} bad records in {self.root} exceed "
                               f"data.max_bad_records={self.max_bad_records}:\n{listing}")
        return batch

    def _all_ranks(self, bad: list[BadRecord]) -> list[BadRecord]:
        """The new bad records of every rank (the same list on each), so that every rank counts the
        same and stops at the same batch: one all-reduce per batch, a gather only when one has some."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return bad
        count = trainer.strategy.reduce(torch.tensor(float(len(bad)), device=trainer.strategy.root_device),
                                        reduce_op="sum")
        if not count:
            return []
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, [(b.id, b.reason) for b in bad])
        return [BadRecord(sid, reason) for rank in everyone for sid, reason in rank]

    def _placeholder(self) -> dict:
        """A stand-in for a training batch that lost every record: one all-zero sample with one
        full-image background box, in the shapes of this dataset. `MppModule.training_step` weighs
        it zero; it exists so that a rank without data still takes part in the step."""
        shapes = self._shapes
        one = {"latents": torch.zeros(1, *self.train_records[0]["latent_shape"]),
               "boxes": torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]), "instance_mask": torch.ones(1, 1, dtype=torch.bool),
               "foreground": torch.zeros(1, 1)}
        for key in ("clip_embeds", "dino_embeds", "instance_text"):
            one[key] = torch.zeros(1, 1, *shapes[key])
        for key in ("prompt_embeds", "pooled_prompt_embeds"):
            one[key] = torch.zeros(1, *shapes[key])
        return {"ids": [], "placeholder": True, **one}

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self._predicting():
            return batch
        # stored as fp16/bf16 to halve reads and transfers; computed in float32 (autocast narrows)
        return {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in batch.items()}

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches": self._batches, "batch_size": self.batch_size,
                "val_fraction": self.val_fraction, "seed": self.seed, "bad_records": dict(self.bad_records)}

    def load_state_dict(self, state: dict) -> None:
        # each decides which samples the interrupted epoch has not used yet
        for name in ("batch_size", "val_fraction", "seed"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(f"data.{name}={getattr(self, name)} differs from the checkpoint's {state[name]}; "
                                 f"an exact resume needs the same data.{name}")
        self._resume = {"epoch": state["epoch"], "batches": state["batches"]}
        self.bad_records = dict(state["bad_records"])
