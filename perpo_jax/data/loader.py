"""Deterministic, per-host sharded, resumable batch iteration over a random-access source.

A source is anything with `len()` and `__getitem__(int)` (a TFDS `as_data_source()` split,
a list of records, ...). Sampling is by index:

- epoch e uses the permutation `np.random.default_rng([seed, e]).permutation(N)` (or the
  identity with `shuffle=False`), identical on every host;
- the order is cut into GLOBAL batches of `batch_size · H` positions; host h takes the
  contiguous block [h · batch_size, (h + 1) · batch_size) of each. The global batch (hosts'
  blocks concatenated in host order, as `jax.make_array_from_process_local_data` lays them
  out) is therefore the same prompts in the same order whatever H is: a 2-host run sees the
  batches of a 1-host run with H × the per-host batch size;
- by default the last partial global batch of an epoch is DROPPED (fixed shapes for jit):
  `N // (batch_size · H)` batches per epoch on every host (so hosts never disagree on when an
  epoch ends), the shards of one epoch disjoint. With `drop_remainder=False` every index is
  used exactly once per epoch: `ceil(N / (batch_size · H))` batches, the blocks of the last
  one shorter (or empty on the hosts past its end), and the caller pads (offline lists: one
  exact pass per epoch; `block_sizes` says how many items each host gets in a batch).

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
        self.global_batch = batch_size * process_count
        n = len(source)
        if drop_remainder:
            self.batches_per_epoch = n // self.global_batch
        else:
            self.batches_per_epoch = -(-n // self.global_batch)
        # items this host takes per epoch (host 0 takes the most without drop_remainder)
        self.per_host = sum(self.block_sizes(b)[process_index]
                            for b in range(self.batches_per_epoch))
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"source of {n} items is fewer than batch_size={batch_size} x {process_count} "
                f"host(s) = {self.global_batch}: no full batch to produce")
        self._epoch = 0
        self._batch = 0
        self._order_cache: tuple[int, np.ndarray] | None = None  # (epoch, its indices)

    def block_sizes(self, batch: int) -> list[int]:
        """Items each host takes in batch `batch` of an epoch (all `batch_size` except in the
        last batch of a `drop_remainder=False` epoch)."""
        start = batch * self.global_batch
        n = len(self.source)
        return [max(0, min(self.batch_size, n - start - h * self.batch_size))
                for h in range(self.process_count)]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """[N] int64: every index in the order of `epoch`, the same on every host."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        n = len(self.source)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle \
            else np.arange(n)
        self._order_cache = (epoch, order)
        return order

    def global_batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        """[<= batch_size · H] int64: batch `batch` of `epoch` over ALL hosts, in host order."""
        start = batch * self.global_batch
        return self.epoch_order(epoch)[start: start + self.global_batch]

    def batch_indices(self, epoch: int, batch: int) -> np.ndarray:
        """[<= batch_size] int64: source indices of batch `batch` of `epoch` on this host."""
        start = batch * self.global_batch + self.process_index * self.batch_size
        return self.epoch_order(epoch)[start: start + self.batch_size]

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """[per_host] int64: this host's indices for `epoch`, in the order they are used."""
        parts = [self.batch_indices(epoch, b) for b in range(self.batches_per_epoch)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

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
