"""Deterministic, per-host sharded, resumable batch iteration over a random-access source.

A source is anything with `len()` and `__getitem__(int)` (a TFDS `as_data_source()` split,
a list of records, ...). Sampling is by index:

- epoch e uses the permutation `np.random.default_rng([seed, e]).permutation(N)` (or the
  identity with `shuffle=False`), identical on every host;
- host h of H takes positions h, h + H, h + 2H, ... of that order, truncated to
  `N // H` items so every host runs the same number of steps (so hosts never disagree on
  when an epoch ends); the shards of one epoch are disjoint and, when H divides N, cover
  every index;
- batches are `batch_size` items per host; by default the last partial batch of a host's
  epoch is DROPPED (fixed shapes for jit), so up to `batch_size - 1` items per host per epoch
  are skipped — different ones each epoch when shuffling. With `drop_remainder=False` every
  index is used exactly once per epoch: host h takes ALL of positions h, h + H, ...; every
  host makes ceil(ceil(N / H) / batch_size) batches, the last ones shorter (or empty on a
  host with fewer items), and the caller pads (offline lists: one exact pass per epoch).

The position is two ints, `{"epoch", "batch"}` (the next batch to produce); `state()` /
`restore()` round-trip it, so a restored loader continues with exactly the same batches.
The loader does not import jax: pass `jax.process_index()` / `jax.process_count()` in.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np


class ShardedLoader:
    """Iterate batches `list[record]` of one host's shard, epoch after epoch.

    Args:
      source: random-access records, `len(source) = N`.
      batch_size: items per batch on THIS host.
      seed: shuffling seed (same on every host).
      process_index, process_count: this host and the number of hosts.
      shuffle: permute each epoch (else natural order).
      num_epochs: stop after this many epochs (None: forever).
      transform: applied to each record as it is read (e.g. decoding).
      drop_remainder: drop each host's last partial batch (see module docstring).
    """

    def __init__(self, source: Sequence[Any], batch_size: int, *, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                 num_epochs: int | None = None, transform: Callable[[Any], Any] | None = None,
                 drop_remainder: bool = True):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.transform = transform
        self.drop_remainder = drop_remainder
        if drop_remainder:
            self.per_host = len(source) // process_count
            self.batches_per_epoch = self.per_host // batch_size
        else:  # host 0 holds the most items; every host makes as many batches as it does
            self.per_host = -(-len(source) // process_count)
            self.batches_per_epoch = -(-self.per_host // batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"source of {len(source)} items gives {self.per_host} per host, fewer than "
                f"batch_size={batch_size}: no full batch to produce")
        self._epoch = 0
        self._batch = 0
        self._order_cache: tuple[int, np.ndarray] | None = None  # (epoch, its indices)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """[N // H] int64 (all of this host's positions without drop_remainder): this host's
        indices for `epoch`, in the order they are used."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        n = len(self.source)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle \
            else np.arange(n)
        mine = order[self.process_index::self.process_count]
        if self.drop_remainder:  # every host the same count
            mine = mine[: self.per_host]
        self._order_cache = (epoch, mine)
        return mine

    def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        """[<= batch_size] int64: source indices of batch `batch` of `epoch` on this host."""
        start = batch * self.batch_size
        return self.epoch_indices(epoch)[start: start + self.batch_size]

    def state(self) -> dict[str, int]:
        """The position of the next batch: {"epoch": e, "batch": b}."""
        return {"epoch": self._epoch, "batch": self._batch}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a position returned by `state()`."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"loader state {state} is outside 0 <= batch < "
                             f"{self.batches_per_epoch} batches per epoch")
        self._epoch, self._batch = epoch, batch

    def __iter__(self):
        return self

    def __next__(self) -> list[Any]:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        indices = self.batch_indices(self._epoch, self._batch)
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        records = [self.source[int(i)] for i in indices]
        return [self.transform(r) for r in records] if self.transform else records


class Subset:
    """The records of `source` at `indices`, in that order, as a random-access source."""

    def __init__(self, source: Sequence[Any], indices: Sequence[int]):
        self.source = source
        self.indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.source[int(self.indices[i])]
