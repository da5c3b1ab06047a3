"""Prepared SFT data (Megatron indexed .bin/.idx): the micro-batches training reads from it equal
what the old whole-dataset in-memory packing produced; the files do not depend on the number of
workers; parquet reads as jsonl does; bad rows are named by file:line; the rows of a step are
the same in a resumed run; and what a rank holds does not grow with the data set."""

import json
import shutil

import numpy as np
import pytest
import torch

from megatron_ring.data.chat_tokenizer import ChatTokenizer
from megatron_ring.data.indexed_sft import SFTDocuments, mask_to_spans, spans_to_mask
from megatron_ring.data.packing import PackedRows
from megatron_ring.data.prepare import prepare_sft
from megatron_ring.data.sft_rows import DataError, read_sft_rows
from megatron_ring.recipe import RecipeError, load_recipe
from megatron_ring.train.sft_data import SFTData, Schedule, load_rows, rank_share, row_capacity
from tests.conftest import demo_data

SMALL = dict(n_sft=80, n_rl_math=8, n_rl_code_science=8, n_heldout=8, n_sft_heldout=8, n_eval=8)
SEQ = 256


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_data(tmp_path_factory, "demo_indexed", **SMALL)


@pytest.fixture(scope="module")
def tok(demo):
    return ChatTokenizer(demo / "tokenizer")


@pytest.fixture(scope="module")
def prepared(demo, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "sft"
    prepare_sft([str(demo / "sft_train.jsonl")], tok, out, SEQ, workers=1, progress=False)
    return out


def old_pack(examples, seq_length, pad_id, pack):
    """The pre-index implementation (dense [N, S] tensors from lists), kept as the reference."""
    lengths = [len(e.ids) - 1 for e in examples]
    rows, free = [], []
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)) if pack else range(len(lengths))
    for i in order:
        fit = [(rem, r) for rem, r in free if rem >= lengths[i]] if pack else []
        if not fit:
            rows.append([i])
            free.append((seq_length - lengths[i], len(rows) - 1))
        else:
            rem, r = min(fit)
            free.remove((rem, r))
            rows[r].append(i)
            free.append((rem - lengths[i], r))
    n = len(rows)
    out = {"input_ids": torch.full((n, seq_length), pad_id), "labels": torch.full((n, seq_length), pad_id),
           "loss_mask": torch.zeros(n, seq_length), "position_ids": torch.zeros(n, seq_length, dtype=torch.long),
           "doc_ids": torch.full((n, seq_length), -1)}
    for r, members in enumerate(rows):
        at = 0
        for d, i in enumerate(members):
            ids, mask, k = examples[i].ids, examples[i].loss_mask, lengths[i]
            out["input_ids"][r, at:at + k] = torch.tensor(ids[:-1])
            out["labels"][r, at:at + k] = torch.tensor(ids[1:])
            out["loss_mask"][r, at:at + k] = torch.tensor(mask[1:], dtype=torch.float)
            out["position_ids"][r, at:at + k] = torch.arange(k)
            out["doc_ids"][r, at:at + k] = d
            at += k
    return out


@pytest.mark.parametrize("pack", [True, False])
def test_micro_batches_equal_the_old_in_memory_packing(demo, tok, prepared, pack):
    examples, _ = read_sft_rows([str(demo / "sft_train.jsonl")], tok, SEQ)
    want = old_pack(examples, SEQ, tok.pad_id, pack)
    docs = SFTDocuments(prepared)
    assert len(docs) == len(examples) and docs.meta["tokens"] == sum(len(e.ids) for e in examples)
    data = SFTData(docs, PackedRows.build(docs.lengths - 1, SEQ, pack), tok.pad_id, {})
    assert len(data) == len(want["input_ids"])
    got = data.batch(list(range(len(data))))
    for name in want:
        assert torch.equal(got[name].to(want[name].dtype), want[name]), name
    assert data.tokens(range(len(data))) == int((want["doc_ids"] >= 0).sum())
    assert data.rows.efficiency == pytest.approx(float((want["doc_ids"] >= 0).float().mean()))


def test_spans_rebuild_any_mask():
    for mask in ([0, 0, 1, 1, 0, 1], [1, 1, 1], [0, 0], [1, 0, 1, 0, 1]):
        assert spans_to_mask(mask_to_spans(mask), len(mask)).tolist() == mask


def test_workers_do_not_change_the_files(demo, tok, prepared, tmp_path):
    prepare_sft([str(demo / "sft_train.jsonl")], tok, tmp_path / "w2", SEQ, workers=2, progress=False)
    for name in ("tokens.bin", "tokens.idx", "loss_spans.bin", "loss_spans.idx", "meta.json"):
        assert (tmp_path / "w2" / name).read_bytes() == (prepared / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_parquet_reads_as_jsonl_does(demo, tok, prepared, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (demo / "sft_train.jsonl").read_text().splitlines()]
    f = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f, row_group_size=17)
    prepare_sft([str(f)], tok, tmp_path / "pq", SEQ, workers=2, progress=False)
    for name in ("tokens.bin", "loss_spans.bin"):
        assert (tmp_path / "pq" / name).read_bytes() == (prepared / name).read_bytes(), name
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([rows[0], {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}, rows[1]]), bad)
    with pytest.raises(DataError, match=rf"{bad}:2: empty response"):
        prepare_sft([str(bad)], tok, tmp_path / "bad", SEQ, workers=1, progress=False)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="junk.parquet: cannot read SFT file"):
        prepare_sft([str(tmp_path / "junk.parquet")], tok, tmp_path / "junk", SEQ, progress=False)


def test_bad_rows_named_by_file_line(tok, tmp_path):
    good = json.dumps({"prompt": "Compute 1+2.", "response": "\\boxed{3}"})
    f = tmp_path / "sft.jsonl"
    f.write_text("\n".join([good, "{oops", good, json.dumps({"prompt": "1+2 " * 200, "response": "3"}), good]) + "\n")
    for workers in (1, 2):
        with pytest.raises(DataError, match=rf"2 bad .*\n  {f}:2: not JSON.*\n  {f}:4: too long"):
            prepare_sft([str(f)], tok, tmp_path / f"out{workers}", 64, "fail", workers, progress=False)
        assert not list(tmp_path.glob(f"*out{workers}*"))  # nothing half-written
        meta = prepare_sft([str(f)], tok, tmp_path / "out", 64, "skip", workers, progress=False)
        assert (meta["documents"], meta["report"]["bad"]) == (3, 2)
        assert meta["report"]["first_bad"][0] == f"{f}:2: not JSON (Expecting property name enclosed in double quotes)"


def test_a_step_reads_the_same_rows_after_resume(prepared, tok):
    def open_data():
        docs = SFTDocuments(prepared)
        return SFTData(docs, PackedRows.build(docs.lengths - 1, SEQ, True), tok.pad_id, {})

    a, b = open_data(), open_data()
    s1, s2 = Schedule(len(a), 8, 3, seed=7), Schedule(len(b), 8, 3, seed=7)
    for step in (1, s1.steps_per_epoch, s1.steps_per_epoch + 1, s1.total_steps):
        rows = s1.rows_of_step(step)
        assert torch.equal(rows, s2.rows_of_step(step))
        for r in range(2):
            for x, y in zip(rank_share(rows, 2, r, 2), rank_share(s2.rows_of_step(step), 2, r, 2)):
                bx, by = a.batch(x.tolist()), b.batch(y.tolist())
                assert all(torch.equal(bx[k], by[k]) for k in bx)
    assert not torch.equal(s1.rows_of_step(1), s1.rows_of_step(s1.steps_per_epoch + 1))


def _held_bytes(data: SFTData) -> int:
    """Bytes of the arrays the data object owns (the memory-mapped token file excluded)."""
    r = data.rows
    return sum(a.nbytes for a in (r.row_ptr, r.members, r.lengths))


def test_what_a_rank_holds_is_per_document_not_per_token(tok, tmp_path):
    rng = np.random.default_rng(0)
    sizes = {}
    for n_docs, seq in ((200, 256), (800, 256), (800, 2048)):
        rows = [{"prompt": "q" * int(rng.integers(1, 20)), "response": "7" * int(rng.integers(1, 200))}
                for _ in range(n_docs)]
        f = tmp_path / f"d{n_docs}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        prepare_sft([str(f)], tok, tmp_path / f"p{n_docs}", seq, progress=False)
        docs = SFTDocuments(tmp_path / f"p{n_docs}")
        data = SFTData(docs, PackedRows.build(docs.lengths - 1, seq, True), tok.pad_id, {})
        arrays = [v for v in vars(data.rows).values() if isinstance(v, np.ndarray)]
        assert all(a.ndim == 1 for a in arrays)  # no [N, S]
        assert isinstance(docs.tokens[0], np.ndarray) and isinstance(docs.tokens.bin_reader._bin_buffer_mmap, np.memmap)
        sizes[n_docs, seq] = _held_bytes(data)
        batch = data.batch([0, 1])
        assert all(t.shape == (2, seq) for t in batch.values())
    assert sizes[800, 256] <= 24 * 800 + 16 * 800  # at most a few int64 per document
    assert sizes[800, 2048] <= sizes[800, 256]  # independent of the row length


def _recipe(demo, run_dir, *extra):
    return load_recipe("recipes/tiny/distill.yaml", [
        f"data.train=[{demo / 'sft_train.jsonl'}]", f"data.tokenizer={demo / 'tokenizer'}", "data.demo=null",
        "data.prepare_workers=1", *extra])


def test_stage_prepares_into_its_cache_once_and_checks_the_tokenizer(demo, tok, prepared, tmp_path):
    recipe = _recipe(demo, tmp_path)
    data = load_rows(recipe, tmp_path, tok)
    caches = list((tmp_path / "cache").iterdir())
    assert len(caches) == 1 and caches[0].name.startswith("sft_")
    assert (caches[0] / "tokens.bin").read_bytes() == (prepared / "tokens.bin").read_bytes()
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["rows"] == len(data) and report["documents"] == len(data.docs) and report["bad"] == 0
    mtime = (caches[0] / "meta.json").stat().st_mtime_ns
    load_rows(_recipe(demo, tmp_path, "data.pack=false"), tmp_path, tok)  # packing is not in the key
    assert (caches[0] / "meta.json").stat().st_mtime_ns == mtime
    # data.prepared is used as it is, and must come from this tokenizer and seq_length
    assert len(load_rows(_recipe(demo, tmp_path, f"data.prepared={prepared}"), tmp_path, tok)) == len(data)
    shutil.copytree(demo / "tokenizer", tmp_path / "tok2")
    config = json.loads((tmp_path / "tok2" / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("<role>ASSISTANT</role>", "<role>ASSISTANT</role>\n")
    (tmp_path / "tok2" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="data.prepared: .* another tokenizer"):
        load_rows(_recipe(demo, tmp_path, f"data.prepared={prepared}"), tmp_path, ChatTokenizer(tmp_path / "tok2"))
    with pytest.raises(DataError, match="longer than data.seq_length"):
        load_rows(_recipe(demo, tmp_path, f"data.prepared={prepared}", "data.seq_length=16"), tmp_path, tok)


def test_token_micro_batches(demo, tok, tmp_path):
    recipe = _recipe(demo, tmp_path, "train.max_tokens_per_micro_batch=1024", "train.micro_batch=1",
                     "train.global_batch=4")
    assert row_capacity(recipe) == 1024
    data = load_rows(recipe, tmp_path, tok)
    assert data.rows.seq_length == 1024 and data.batch([0])["input_ids"].shape == (1, 1024)
    positions = int((data.docs.lengths - 1).sum())
    assert len(data) == -(-positions // 1024)  # short documents fill every row but the last
    assert data.report["packing_efficiency"] == round(positions / (len(data) * 1024), 4)
    with pytest.raises(RecipeError, match=r"train.max_tokens_per_micro_batch: 128 is below data.seq_length \(256\)"):
        row_capacity(_recipe(demo, tmp_path, "train.max_tokens_per_micro_batch=128", "train.micro_batch=1"))
    with pytest.raises(RecipeError, match="train.micro_batch, train.max_tokens_per_micro_batch"):
        row_capacity(_recipe(demo, tmp_path, "train.max_tokens_per_micro_batch=1024", "train.micro_batch=4"))
    with pytest.raises(RecipeError, match="data.pack"):
        row_capacity(_recipe(demo, tmp_path, "train.max_tokens_per_micro_batch=1024", "train.micro_batch=1",
                             "data.pack=false"))


def test_packed_rows_need_one_row_per_micro_batch_under_transformer_engine(demo, tmp_path, monkeypatch):
    import megatron_ring.models.spec as spec

    monkeypatch.setattr(spec, "te_by_default", lambda: True)
    with pytest.raises(RecipeError, match="train.micro_batch: packed rows run as THD"):
        row_capacity(_recipe(demo, tmp_path, "train.micro_batch=4"))
    assert row_capacity(_recipe(demo, tmp_path, "train.micro_batch=4", "data.pack=false")) == SEQ
