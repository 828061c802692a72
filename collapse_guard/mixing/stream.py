"""A deterministic, rank-sharded, endless stream of real examples for top-ups, tokenized on demand.

Nothing is tokenized up front and nothing per row is kept but one 32-bit permutation entry (map-style
pools), so a pool of ten million rows costs 40 MB and no start-up time. Streaming pools
(`IterableDataset`) are read in order through their own seeded shuffle buffer, split by rank.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from collapse_guard.distributed import rank_world

logger = logging.getLogger(__name__)


class RealStream:
    """`next()` -> a tokenized real example; the position survives checkpoints (`state_dict`)."""

    def __init__(self, dataset, tokenize: Callable[[dict[str, Any]], dict[str, list[int]]], seed: int = 0,
                 shuffle_buffer: int = 10_000):
        self.dataset = dataset
        self.tokenize = tokenize
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.streaming = not hasattr(dataset, "__len__")
        self.draws = 0  # draws made by this rank
        self._order: np.ndarray | None = None
        self._order_epoch = -1
        self._iterator = None
        self._iter_epoch = -1

    def __len__(self) -> int:
        return len(self.dataset) if not self.streaming else 0

    def next(self) -> dict[str, list[int]]:
        raw = self._next_streaming() if self.streaming else self._next_indexed()
        self.draws += 1
        return self.tokenize(raw)

    def _next_indexed(self) -> dict[str, Any]:
        rank, world = rank_world()
        n = len(self.dataset)
        epoch, offset = divmod(self.draws * world + rank, n)
        if epoch != self._order_epoch:
            if self._order_epoch < 1 <= epoch:  # the first pass is over (or was, before a resume)
                self._say_used_up(f"{n} rows")
            dtype = np.int32 if n < 2**31 else np.int64
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n).astype(dtype)
            self._order_epoch = epoch
        return self.dataset[int(self._order[offset])]

    def _next_streaming(self) -> dict[str, Any]:
        while True:
            if self._iterator is None:
                self._iter_epoch += 1
                if self._iter_epoch == 1:
                    self._say_used_up("streamed")
                self._iterator = iter(self._shard(self._iter_epoch))
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None

    def _say_used_up(self, pool: str) -> None:
        # top-ups promise fresh rows; from here on they repeat, which a high floor can memorise
        rank, world = rank_world()
        if rank == 0:
            logger.warning("RealStream: the real pool (%s) is used up after %d top-ups; further top-ups "
                           "repeat rows. Give a larger real_dataset or a lower floor.", pool,
                           self.draws * world)

    def _shard(self, epoch: int):
        from datasets.distributed import split_dataset_by_node

        rank, world = rank_world()
        data = self.dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        data.set_epoch(epoch)
        return split_dataset_by_node(data, rank=rank, world_size=world) if world > 1 else data

    def state_dict(self) -> dict[str, int]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.draws = int(state["draws"])
        if self.streaming:  # replay the stream to the same position (cheap next to a training step)
            self._iterator, self._iter_epoch = None, -1
            for _ in range(self.draws):
                self._next_streaming()
