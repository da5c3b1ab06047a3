"""SFT rows: loss on responses only, bad rows (not UTF-8, not JSON, wrong schema, too long) counted
and named by file:line (skip or fail), RL prompt rows checked the same way, and the step
schedule's batching invariants."""

import json

import pytest
import torch

from megatron_ring.data.chat_tokenizer import ChatTokenizer, TokenizerError
from megatron_ring.data.demo_data import write_demo_data
from megatron_ring.data.rl_prompts import read_prompts
from megatron_ring.data.jsonl_rows import RowReport
from megatron_ring.data.sft_rows import DataError, check_sft_rows, read_sft_rows
from megatron_ring.train.sft_data import Schedule, rank_share

SMALL = dict(n_sft=60, n_rl_math=8, n_rl_code_science=8, n_heldout=8, n_sft_heldout=8, n_eval=8)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_small")
    write_demo_data(out, **SMALL)
    return ChatTokenizer(out / "tokenizer")


def test_prompt_tokens_carry_no_loss(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 12+30."},
                {"role": "assistant", "content": "2+0=2. 1+3=4. \\boxed{42}"},
                {"role": "user", "content": "And 1+1?"}, {"role": "assistant", "content": "\\boxed{2}"}]
    ids, mask = tok.encode_chat(messages)
    assert len(ids) == len(mask)
    assert tok.decode(ids) == tok.decode(tok.encode(tok.render(messages)))
    learned = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(learned) == "2+0=2. 1+3=4. \\boxed{42}\\boxed{2}"
    assert learned.count(tok.eos_id) == 2  # each answer learns to end its turn
    prompt = tok.encode_prompt(messages[:2])
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_bad_rows_are_counted_and_named(tok, tmp_path):
    good = json.dumps({"prompt": "Compute 1+2.", "response": "\\boxed{3}"})
    f = write_lines(tmp_path / "sft.jsonl", [
        good, "{not json", json.dumps({"prompt": "x"}), json.dumps({"prompt": "x", "response": "  "}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"prompt": "Compute 1+2. " * 40, "response": "\\boxed{3}"}), "",
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
    ])
    examples, report = read_sft_rows([str(f)], tok, max_tokens=64, on_bad="skip")
    assert [e.source for e in examples] == [f"{f}:1", f"{f}:8"]
    assert (report.total, report.kept, report.n_bad) == (7, 2, 5)
    assert report.reasons == {"not JSON": 1, "missing or non-string 'response'": 1, "empty response": 1,
                              "no assistant message": 1, "too long": 1}
    assert report.first[0].startswith(f"{f}:2: not JSON")
    with pytest.raises(DataError, match=rf"{f}:2: not JSON") as e:
        read_sft_rows([str(f)], tok, max_tokens=64, on_bad="fail")
    assert "5 bad" in str(e.value) and "data.bad_rows=skip" in str(e.value)


def test_non_utf8_rows_are_bad_rows_named_by_file_line(tok, tmp_path):
    """A row with bytes that are not UTF-8 costs that row, not the file: skipped under skip,
    named by file:line under fail, in the stage's reader, the launcher's and the RL prompts'."""
    good = json.dumps({"prompt": "Compute 1+2.", "response": "\\boxed{3}"}).encode()
    f = tmp_path / "sft.jsonl"
    f.write_bytes(b"\n".join([good, b'{"prompt": "caf\xe9", "response": "x"}', good, b"\xff\xfe", good]) + b"\n")
    examples, report = read_sft_rows([str(f)], tok, max_tokens=64, on_bad="skip")
    assert [e.source for e in examples] == [f"{f}:1", f"{f}:3", f"{f}:5"]
    assert report.reasons == {"not UTF-8": 2}
    assert report.first == [f"{f}:2: not UTF-8 (byte 0xe9 at column 16)", f"{f}:4: not UTF-8 (byte 0xff at column 1)"]
    for read in (lambda: read_sft_rows([str(f)], tok, max_tokens=64), lambda: check_sft_rows([str(f)])):
        with pytest.raises(DataError, match=rf"2 bad \(2 not UTF-8\)\n  {f}:2: not UTF-8"):
            read()
    assert check_sft_rows([str(f)], on_bad="skip").kept == 3
    rl = tmp_path / "rl.jsonl"
    rl.write_bytes(json.dumps({"domain": "math", "prompt": "1+1?", "answer": "2"}).encode() + b"\n\x80\n")
    report = RowReport()
    rows = read_prompts([str(rl)], on_bad="skip", report=report)
    assert len(rows) == 1 and report.first == [f"{rl}:2: not UTF-8 (byte 0x80 at column 1)"]
    with pytest.raises(DataError, match=rf"{rl}:2: not UTF-8"):
        read_prompts([str(rl)])


def test_rl_prompt_rows(tmp_path):
    f = write_lines(tmp_path / "rl.jsonl", [
        json.dumps({"domain": "math", "prompt": "1+1?", "answer": 2}),
        json.dumps({"domain": "code", "prompt": "p", "code_test_cases": [{"input": "1\n", "output": "1\n"}],
                    "code_language": "python", "groundtruth": "print(input())"}),
        json.dumps({"domain": "code", "prompt": "p", "code_test_cases": []}),
        json.dumps({"domain": "poetry", "prompt": "p", "answer": "x"}),
    ])
    report = RowReport()
    rows = read_prompts([str(f)], on_bad="skip", report=report)
    assert [r.domain for r in rows] == ["math", "code"] and rows[0].answer == "2"
    assert report.n_bad == 2 and report.first[1].startswith(f"{f}:4: 'domain' must be one of")
    with pytest.raises(DataError, match="bad RL prompt rows.*code_test_cases"):
        read_prompts([str(f)])
    assert [r.domain for r in read_prompts([str(f)], domains=["code"], on_bad="skip")] == ["code"]
    with pytest.raises(DataError, match=r"no prompts of domains \['science'\] in"):
        read_prompts([str(f)], domains=["science"], on_bad="skip")


def test_tokenizer_directory_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        ChatTokenizer(tmp_path)


@pytest.mark.parametrize("n_rows, batch, dp, micro", [(45, 8, 2, 4), (16, 16, 2, 2), (7, 4, 4, 1)])
def test_schedule_uses_every_row_and_balances_ranks(n_rows, batch, dp, micro):
    s = Schedule(n_rows, batch, epochs=2, seed=5)
    for epoch in range(2):
        steps = range(epoch * s.steps_per_epoch + 1, (epoch + 1) * s.steps_per_epoch + 1)
        used = torch.cat([s.rows_of_step(k) for k in steps])
        assert len(used) == s.steps_per_epoch * batch
        assert set(used.tolist()) == set(range(n_rows))  # every row, wrap-around fills the last batch
        assert len(used) - len(set(used.tolist())) == s.steps_per_epoch * batch - n_rows
    for k in (1, s.total_steps):
        rows = s.rows_of_step(k)
        shares = [rank_share(rows, dp, r, micro) for r in range(dp)]
        assert len({len(x) for x in shares}) == 1  # the same number of micro-batches on every rank
        assert sorted(torch.cat([m for x in shares for m in x]).tolist()) == sorted(rows.tolist())
    assert not torch.equal(s.rows_of_step(1), s.rows_of_step(s.steps_per_epoch + 1)) or n_rows <= batch


def test_parquet_rows_read_as_jsonl_rows(tok, tmp_path):
    """The launcher's check and the stage's reader take parquet too; a bad row is named by its
    1-based row number, and a key some rows lack (null in parquet) reads as absent."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "Compute 1+2."}, {"role": "assistant", "content": "3"}]},
            {"messages": [{"role": "user", "content": "q"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "domain": "x"}]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.Table.from_pylist(rows[2:]).schema), tmp_path / "sft.parquet")
    write_lines(tmp_path / "sft.jsonl", [json.dumps(r) for r in rows])
    got = {ext: read_sft_rows([str(tmp_path / f"sft.{ext}")], tok, 64, on_bad="skip") for ext in ("parquet", "jsonl")}
    assert [e.ids for e in got["parquet"][0]] == [e.ids for e in got["jsonl"][0]] and len(got["jsonl"][0]) == 2
    with pytest.raises(DataError, match=rf"{tmp_path / 'sft.parquet'}:2: no assistant message"):
        check_sft_rows([str(tmp_path / "sft.parquet")])
