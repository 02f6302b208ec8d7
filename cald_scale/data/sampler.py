# Sharding: which sample indices each rank reads at each (optimizer step, micro step),
# computed directly from the step number, so resuming needs no replay of the data order.
from __future__ import annotations

import numpy as np

__all__ = ["ShardedBatches", "eval_batches"]


class ShardedBatches:
    """Deterministic, resumable training batches.

    One optimizer step consumes a global batch of micro_batch_size x grad_accum x
    world_size samples from a per-epoch permutation seeded by (seed, epoch); epoch e covers
    steps [e * steps_per_epoch, (e + 1) * steps_per_epoch) and drops the remainder of the
    permutation (a different remainder each epoch). Within a step, micro step m of rank r
    reads the slice at position (m * world_size + r) * micro_batch_size: ranks and micro
    steps are disjoint.

    Memory: one permutation of dataset_len indices (4 bytes each below 2**31 samples).
    With shuffle=False the order is the dataset's own (e.g. Pythia's pre-shuffled Pile).
    """

    def __init__(
        self,
        dataset_len: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        *,
        grad_accum: int = 1,
        shuffle: bool = True,
        what: str = "sequences",
        remedy: str = "use a larger corpus, a smaller batch or a smaller data.seq_len",
    ):
        if micro_batch_size < 1 or grad_accum < 1 or world_size < 1:
            raise ValueError(
                f"micro_batch_size ({micro_batch_size}), grad_accum ({grad_accum}) and "
                f"world_size ({world_size}) must be >= 1"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.dataset_len = dataset_len
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.grad_accum = grad_accum
        self.shuffle = shuffle
        self.global_batch_size = micro_batch_size * grad_accum * world_size
        if dataset_len < self.global_batch_size:
            raise ValueError(
                f"the dataset has {dataset_len} {what}, fewer than one global batch of "
                f"{self.global_batch_size} (micro_batch_size {micro_batch_size} x grad_accum "
                f"{grad_accum} x world_size {world_size}); {remedy}"
            )
        self.steps_per_epoch = dataset_len // self.global_batch_size
        self._epoch: int | None = None
        self._order: np.ndarray | None = None

    def epoch(self, step: int) -> int:
        """The pass over the data that optimizer step `step` belongs to."""
        return step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch``: global batch b is its slice [b * global_batch_size, ...)."""
        if self._epoch != epoch:
            dtype = np.int32 if self.dataset_len < 2**31 else np.int64
            order = np.arange(self.dataset_len, dtype=dtype)
            if self.shuffle:
                np.random.default_rng([self.seed, epoch]).shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order

    def indices(self, step: int, micro_step: int) -> list[int]:
        """This rank's sample indices for optimizer step `step`, micro step `micro_step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not 0 <= micro_step < self.grad_accum:
            raise ValueError(f"micro_step {micro_step} is outside grad_accum {self.grad_accum}")
        order = self._permutation(self.epoch(step))
        start = (step % self.steps_per_epoch) * self.global_batch_size
        start += (micro_step * self.world_size + self.rank) * self.micro_batch_size
        return order[start : start + self.micro_batch_size].tolist()


def eval_batches(
    dataset_len: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    max_batches: int | None = None,
) -> list[list[int]]:
    """This rank's eval batches, in order: global eval batch b is indices
    [b * micro_batch_size * world_size, ...) and rank r takes its r-th slice.

    Every rank gets the same number of batches (so collectives stay matched); the last
    ones may be short or empty. Without max_batches the ranks together cover every index
    exactly once; with it, the first max_batches global batches.
    """
    if micro_batch_size < 1 or world_size < 1:
        raise ValueError(
            f"micro_batch_size ({micro_batch_size}) and world_size ({world_size}) must be >= 1"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    global_batch = micro_batch_size * world_size
    num_batches = -(-dataset_len // global_batch)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    batches = []
    for b in range(num_batches):
        start = b * global_batch + rank * micro_batch_size
        batches.append(list(range(min(start, dataset_len), min(start + micro_batch_size, dataset_len))))
    return batches
