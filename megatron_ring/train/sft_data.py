"""The distillation data of a run: a prepared directory (Megatron indexed .bin/.idx, see
data/indexed_sft.py) opened memory-mapped by every rank, its documents packed into rows from
their lengths alone; each rank then reads the tokens of its own micro-batches only, step by
step. The directory is `data.prepared` (`megatron-ring data prepare`), or, unset, rank 0
prepares `data.train` into RUN_DIR/cache/sft_<key>/ (keyed by the data recipe, the files and
the tokenizer) while the others wait. The schedule says which rows each step takes, so a
resumed run sees exactly the rows an uninterrupted one would."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import torch

from megatron_ring.data.indexed_sft import META, SFTDocuments, tokenizer_fingerprint
from megatron_ring.data.jsonl_rows import DataError
from megatron_ring.data.packing import PackedRows
from megatron_ring.data.prepare import prepare_sft
from megatron_ring.data.sft_rows import role_map
from megatron_ring.platform.distributed import is_rank0, rank0_then_barrier
from megatron_ring.recipe import RecipeError
from megatron_ring.recipe.schema import expand

# Keys that do not change the prepared documents (packing happens when training reads them).
_NOT_IN_KEY = ("prepared", "prepare_workers", "pack", "demo_sft_rows")


def row_capacity(recipe) -> int:
    """Positions per row: train.max_tokens_per_micro_batch when set (one packed row per
    micro-batch: the schema holds train.micro_batch at 1), else data.seq_length. RecipeError
    names the keys that do not fit together."""
    from megatron_ring.models.spec import te_by_default

    t, d = recipe.train, recipe.data
    if t.max_tokens_per_micro_batch:
        if t.max_tokens_per_micro_batch < d.seq_length:
            raise RecipeError(f"train.max_tokens_per_micro_batch: {t.max_tokens_per_micro_batch} is below "
                              f"data.seq_length ({d.seq_length}); the longest document must fit one micro-batch")
        if not d.pack:
            raise RecipeError("data.pack: train.max_tokens_per_micro_batch packs documents; set data.pack=true")
    if d.pack and t.micro_batch != 1 and te_by_default():
        raise RecipeError(f"train.micro_batch: packed rows run as THD under transformer-engine, one row per "
                          f"micro-batch; set train.micro_batch=1 (got {t.micro_batch}) or data.pack=false")
    return t.max_tokens_per_micro_batch or d.seq_length


def row_keys(recipe) -> dict:
    return {"messages_key": recipe.data.messages_key, "roles": role_map(recipe.data.roles)}


def prepare_recipe_data(recipe, run_dir: Path, tokenizer, out: str | Path, workers: int | None = None,
                        progress: bool = True) -> dict:
    """`data prepare` and the stage's own cache: data.train -> out; returns its meta."""
    d = recipe.data
    if not d.train:
        raise RecipeError("data.train: no SFT files given")
    files = [expand(p, run_dir) for p in d.train]
    try:
        return prepare_sft(files, tokenizer, out, d.seq_length, d.bad_rows,
                           d.prepare_workers if workers is None else workers, row_keys(recipe), progress)
    except DataError as e:
        raise DataError(f"data.train: {e}") from None


def _cache_key(recipe, run_dir: Path, tokenizer) -> str:
    data = {k: v for k, v in dataclasses.asdict(recipe.data).items() if k not in _NOT_IN_KEY}
    h = hashlib.sha256(json.dumps(data, sort_keys=True).encode())
    for f in (expand(p, run_dir) for p in recipe.data.train):
        st = os.stat(f) if os.path.exists(f) else None
        h.update(f"{f}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1}".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:16]


def prepared_dir(recipe, run_dir: Path, tokenizer) -> Path:
    """data.prepared, else the run's cache, prepared by rank 0 now unless already there."""
    if recipe.data.prepared:
        return Path(expand(recipe.data.prepared, run_dir))
    out = run_dir / "cache" / f"sft_{_cache_key(recipe, run_dir, tokenizer)}"

    def build():
        if not (out / META).is_file():
            prepare_recipe_data(recipe, run_dir, tokenizer, out)

    rank0_then_barrier(build)
    return out


def open_documents(recipe, run_dir: Path, tokenizer) -> SFTDocuments:
    """The prepared documents, checked against the recipe's tokenizer and sequence length."""
    path = prepared_dir(recipe, run_dir, tokenizer)
    key = "data.prepared" if recipe.data.prepared else "data.train"
    try:
        docs = SFTDocuments(path)
    except DataError as e:
        raise DataError(f"{key}: {e}") from None
    want = tokenizer_fingerprint(tokenizer)
    if docs.meta["tokenizer"] != want:
        raise DataError(f"{key}: {path} was tokenised by another tokenizer ({docs.meta.get('tokenizer_path')}, "
                        f"fingerprint {docs.meta['tokenizer']}) than data.tokenizer {tokenizer.path} "
                        f"(fingerprint {want}); prepare it again with this recipe")
    longest = int(docs.lengths.max()) - 1
    if longest > recipe.data.seq_length:
        raise DataError(f"{key}: {path} holds a document of {longest + 1} tokens, longer than data.seq_length "
                        f"({recipe.data.seq_length}) allows; prepare it with this seq_length")
    return docs


@dataclasses.dataclass
class SFTData:
    """What training reads: the documents (memory-mapped) and the rows over them (numpy
    document indices). Nothing here is [N, S]: `batch(rows)` builds the tensors of one
    micro-batch when it is needed."""

    docs: SFTDocuments
    rows: PackedRows
    pad_id: int
    report: dict

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, rows) -> dict[str, torch.Tensor]:
        return self.rows.batch(rows, self.docs, self.pad_id)

    def tokens(self, rows) -> int:
        return self.rows.used(rows)


def load_rows(recipe, run_dir: Path, tokenizer) -> SFTData:
    """The run's data and its report (RUN_DIR/data_report.json). Raises DataError (naming
    file:line) on bad rows when the recipe says fail."""
    capacity = row_capacity(recipe)
    docs = open_documents(recipe, run_dir, tokenizer)
    rows = PackedRows.build(docs.lengths - 1, capacity, recipe.data.pack)
    report = dict(docs.meta["report"], documents=len(docs), rows=len(rows), row_length=capacity,
                  packed=recipe.data.pack, packing_efficiency=round(rows.efficiency, 4),
                  tokens=docs.meta["tokens"], prepared=str(docs.path))
    if is_rank0():
        (run_dir / "data_report.json").write_text(json.dumps(report, indent=2))
    return SFTData(docs, rows, tokenizer.pad_id, report)


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
