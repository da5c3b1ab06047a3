"""The RL prompts, tokenised once, and the order they are drawn in: a seeded permutation per pass
over the data, read at a cursor that the checkpoint saves, so a resumed run draws the same
prompts and every drawn prompt has a unique global index (its sampling seed key)."""

from __future__ import annotations

import random

from megatron_ring.data.rl_prompts import PromptRow


class PromptStream:
    def __init__(self, rows: list[PromptRow], token_ids: list[list[int]], seed: int):
        self.rows, self.token_ids, self.seed = rows, token_ids, seed
        self._orders: dict[int, list[int]] = {}

    def take(self, cursor: int, n: int) -> list[int]:
        """Global indices cursor..cursor+n-1 -> prompt indices."""
        return [self.index(c) for c in range(cursor, cursor + n)]

    def index(self, cursor: int) -> int:
        n = len(self.rows)
        epoch = cursor // n
        if epoch not in self._orders:
            order = list(range(n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch][cursor % n]
