"""The distillation data of a run: rows read, tokenised and packed once by rank 0 into
RUN_DIR/cache (keyed by the data recipe, the files and the tokenizer), then loaded by every
rank; and the deterministic order in which steps take rows, so a resumed run sees exactly the
rows an uninterrupted one would."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import torch

from megatron_ring.data.packing import PackedRows, pack
from megatron_ring.data.sft_rows import read_sft_rows
from megatron_ring.platform.distributed import rank0_then_barrier
from megatron_ring.recipe.schema import expand


def _cache_key(recipe, run_dir: Path, tokenizer) -> str:
    h = hashlib.sha256(json.dumps(dataclasses.asdict(recipe.data), sort_keys=True).encode())
    for f in [*(expand(p, run_dir) for p in recipe.data.train), tokenizer.path / "tokenizer.json"]:
        st = os.stat(f) if os.path.exists(f) else None
        h.update(f"{f}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}".encode())
    return h.hexdigest()[:16]


def load_rows(recipe, run_dir: Path, tokenizer) -> tuple[PackedRows, dict]:
    """(packed rows, data report). Raises DataError (naming file:line) on bad rows when the
    recipe says fail."""
    cache = run_dir / "cache" / f"sft_{_cache_key(recipe, run_dir, tokenizer)}.pt"

    def build():
        if cache.is_file():
            return
        files = [expand(p, run_dir) for p in recipe.data.train]
        examples, report = read_sft_rows(files, tokenizer, recipe.data.seq_length, recipe.data.bad_rows)
        rows = pack(examples, recipe.data.seq_length, tokenizer.pad_id, recipe.data.pack)
        info = dict(report.as_dict(), rows=len(rows), packed=recipe.data.pack,
                    packing_efficiency=round(rows.efficiency, 4), documents=len(examples))
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({"rows": dataclasses.asdict(rows), "report": info}, tmp)
        os.replace(tmp, cache)
        (run_dir / "data_report.json").write_text(json.dumps(info, indent=2))

    rank0_then_barrier(build)
    saved = torch.load(cache, weights_only=True)
    return PackedRows(**saved["rows"]), saved["report"]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which rows each optimizer step uses. An epoch is a seeded permutation of all rows; its
    last global batch is completed by wrapping to the permutation's start, so no row is skipped
    and every step has exactly global_batch rows."""

    n_rows: int
    global_batch: int
    epochs: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_rows / self.global_batch)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def rows_of_step(self, step: int) -> torch.Tensor:
        """Row indices of 1-based optimizer step `step`."""
        epoch, k = divmod(step - 1, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.n_rows, generator=g)
        need = self.steps_per_epoch * self.global_batch
        order = order.repeat(math.ceil(need / self.n_rows))[:need]
        return order[k * self.global_batch:(k + 1) * self.global_batch]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def is_epoch_end(self, step: int) -> bool:
        return step > 0 and step % self.steps_per_epoch == 0


def rank_share(rows: torch.Tensor, dp: int, dp_rank: int, micro_batch: int) -> list[torch.Tensor]:
    """This data-parallel rank's micro-batches of a global batch: every rank gets the same
    number, and the ranks together use each row exactly once."""
    assert len(rows) % (dp * micro_batch) == 0, f"{len(rows)} rows do not split over {dp} ranks x {micro_batch}"
    share = len(rows) // dp
    mine = rows[dp_rank * share:(dp_rank + 1) * share]
    return list(mine.split(micro_batch))
