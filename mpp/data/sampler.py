"""A batch sampler that keeps every batch inside one aspect-ratio bucket, sharded by rank,
seeded per epoch, and able to start mid-epoch."""

from __future__ import annotations

from collections.abc import Hashable, Iterator

import torch
from torch.utils.data import Sampler


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of `batch_size` dataset indices, each from one bucket (`buckets[i]` is sample i's).

    With `shuffle` (training), each epoch: a permutation of the samples seeded by (seed, epoch),
    split by bucket in that order, each bucket cut into global batches of batch_size × num_replicas
    samples (an incomplete last one is dropped: a different remainder each epoch), and the global
    batches put in an order drawn from the same generator. Rank r takes the r-th slice of each
    global batch, so ranks see disjoint samples, take the same number of batches, and are in the
    same bucket at every step (equal work, no rank waits on a larger frame).

    Without `shuffle` (validation): the samples in order, each bucket padded to a multiple of
    num_replicas by wrapping around it, cut into global batches (a bucket's last may be smaller),
    sliced by rank the same way: nothing is dropped and every rank takes the same number of batches.

    `skip(n, epoch)` makes the iteration of that epoch start after this rank's first n batches:
    that is how a resumed run gets exactly the batches its interrupted epoch had not yet used
    (and nothing is skipped when the interrupted epoch had ended).
    """

    def __init__(self, buckets: list[Hashable], batch_size: int, *, rank: int = 0, num_replicas: int = 1,
                 shuffle: bool = True, seed: int = 0):
        assert 0 <= rank < num_replicas and batch_size >= 1
        self.buckets, self.batch_size = list(buckets), batch_size
        self.rank, self.num_replicas, self.shuffle, self.seed = rank, num_replicas, shuffle, seed
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, batches)
        self._keys = sorted(set(self.buckets), key=repr)
        self._counts = [len(m) for m in self._members(list(range(len(self.buckets)))).values()]

    @property
    def sampler(self) -> BucketBatchSampler:
        """Lightning sets each epoch on ``batch_sampler.sampler`` (never on a batch sampler itself), so
        this batch sampler is its own sampler."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, n: int, epoch: int) -> None:
        self._skip = (epoch, n)

    def _members(self, order: list[int]) -> dict[Hashable, list[int]]:
        members: dict[Hashable, list[int]] = {key: [] for key in self._keys}
        for i in order:
            members[self.buckets[i]].append(i)
        return members

    def global_batches(self) -> list[list[int]]:
        """The current epoch's global batches (every rank's samples of a step), in order."""
        per_step = self.batch_size * self.num_replicas
        if not self.shuffle:
            out = []
            for members in self._members(list(range(len(self.buckets)))).values():
                if members and len(members) % self.num_replicas:
                    pad = self.num_replicas - len(members) % self.num_replicas
                    members = members + (members * (pad // len(members) + 1))[:pad]
                out += [members[i : i + per_step] for i in range(0, len(members), per_step)]
            return out
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.buckets), generator=g).tolist()
        out = [members[i : i + per_step] for members in self._members(order).values()
               for i in range(0, len(members) - per_step + 1, per_step)]
        return [out[i] for i in torch.randperm(len(out), generator=g).tolist()]

    def batches(self) -> list[list[int]]:
        """This rank's full share of the current epoch, batch by batch."""
        out = []
        for step in self.global_batches():
            share = len(step) // self.num_replicas
            out.append(step[self.rank * share : (self.rank + 1) * share])
        return out

    def __len__(self) -> int:
        # the full share even when skipping: a resumed loop counts the skipped batches as done
        per_step = self.batch_size * self.num_replicas
        if self.shuffle:
            return sum(c // per_step for c in self._counts)
        return sum(-(-(c + (-c) % self.num_replicas) // per_step) for c in self._counts)

    def __iter__(self) -> Iterator[list[int]]:
        # a generator: the epoch's order and the skip are decided when the first batch is drawn, not at
        # iter(); a DataLoader with workers calls iter() twice and draws from the second iterator only
        share = self.batches()
        if self._skip is not None:
            epoch, n = self._skip
            self._skip = None
            if epoch == self.epoch:
                share = share[n:]
        yield from share
