"""A rank-sharded, epoch-seeded sampler that can start mid-epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableShardSampler(Sampler[int]):
    """Each epoch, a permutation seeded by (seed, epoch), cut to a multiple of `num_replicas`
    (drop_last) or padded by wrapping around, and strided by rank so ranks see disjoint samples.

    `skip(n, epoch)` makes the iteration of that epoch start after the first n indices of this
    rank's share: that is how a resumed run gets exactly the samples its interrupted epoch had not
    yet used (and nothing is skipped when the interrupted epoch had ended).
    """

    def __init__(self, num_samples: int, *, rank: int = 0, num_replicas: int = 1, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True):
        assert 0 <= rank < num_replicas
        self.num_samples, self.rank, self.num_replicas = num_samples, rank, num_replicas
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, n: int, epoch: int) -> None:
        self._skip = (epoch, n)

    def __len__(self) -> int:
        # the full share even when skipping: a resumed loop counts the skipped batches as done
        if self.drop_last:
            return self.num_samples // self.num_replicas
        return -(-self.num_samples // self.num_replicas)

    def indices(self) -> list[int]:
        """This rank's full share of the current epoch."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        if self.drop_last:
            order = order[: len(order) - len(order) % self.num_replicas]
        elif order and len(order) % self.num_replicas:
            pad = self.num_replicas - len(order) % self.num_replicas
            order += (order * (pad // len(order) + 1))[:pad]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        share = self.indices()
        if self._skip is not None:
            epoch, n = self._skip
            self._skip = None
            if epoch == self.epoch:
                share = share[n:]
        return iter(share)
