"""An endless, seeded, resumable loader of prompt batches.

Each epoch visits the data set in its own permutation, a pure function of ``(seed, epoch)``.
Batches run across epoch boundaries (a batch may hold the end of one epoch and the start of the
next), so a batch is never empty and resuming at an epoch boundary never yields zero steps.
The state is three plain ints (``epoch``, ``position``, ``seed``, plus the data set size as a
guard), so it survives ``torch.load(weights_only=True)`` and JSON.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any


class PromptLoader:
    def __init__(self, dataset: Sequence[Any], batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError("PromptLoader needs a non-empty data set")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0  # index into this epoch's permutation of the next item
        self._perm_epoch = -1
        self._perm: list[int] = []

    def __len__(self) -> int:
        """Batches per epoch (rounded up); the loader itself is endless."""
        return (len(self.dataset) + self.batch_size - 1) // self.batch_size

    def permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            perm = list(range(len(self.dataset)))
            random.Random(f"fastgrpo-loader-{self.seed}-{epoch}").shuffle(perm)
            self._perm, self._perm_epoch = perm, epoch
        return self._perm

    def next_indices(self) -> list[int]:
        out: list[int] = []
        n = len(self.dataset)
        while len(out) < self.batch_size:
            perm = self.permutation(self.epoch)
            take = min(self.batch_size - len(out), n - self.position)
            out.extend(perm[self.position : self.position + take])
            self.position += take
            if self.position >= n:
                self.epoch += 1
                self.position = 0
        return out

    def next_batch(self) -> list[Any]:
        return [self.dataset[i] for i in self.next_indices()]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": int(self.epoch),
            "position": int(self.position),
            "seed": int(self.seed),
            "dataset_size": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        size = state.get("dataset_size")
        if size is not None and int(size) != len(self.dataset):
            raise ValueError(
                f"loader state is for a data set of {int(size)} prompts, this one has "
                f"{len(self.dataset)} (the data or its filtering changed since the checkpoint)"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.dataset):
            raise ValueError(f"invalid loader state: epoch={epoch}, position={position}")
        self.seed = int(state.get("seed", self.seed))
        self._perm_epoch = -1
        self.epoch, self.position = epoch, position
        if self.position == len(self.dataset):  # normalise an end-of-epoch position
            self.epoch, self.position = self.epoch + 1, 0
