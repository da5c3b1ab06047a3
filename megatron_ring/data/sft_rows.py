"""SFT rows from jsonl: chat ({"messages": [...]}) or {"prompt", "response"}, tokenised with
loss on the responses only; bad rows are handled by jsonl_rows (counted, named, skip or fail)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ring.data.chat_tokenizer import ChatTokenizer
from megatron_ring.data.jsonl_rows import DataError, RowReport, read_rows

__all__ = ["DataError", "Example", "RowReport", "check_sft_rows", "read_sft_rows", "row_messages"]

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    ids: list[int]
    loss_mask: list[int]
    source: str  # file:line


def row_messages(row) -> list[dict]:
    """The conversation of one row; ValueError says what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{role: {'|'.join(ROLES)}, content: string}}")
        answers = [m for m in messages if m["role"] == "assistant"]
        if not answers:
            raise ValueError("no assistant message")
        if not all(m["content"].strip() for m in answers):
            raise ValueError("empty response")
        return messages
    if "prompt" in row or "response" in row:
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"missing or non-string '{key}'")
        if not row["response"].strip():
            raise ValueError("empty response")
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    raise ValueError("missing 'messages' (or 'prompt' and 'response')")


_HINT = " (set data.bad_rows=skip to skip them)"


def read_sft_rows(paths: list[str], tokenizer: ChatTokenizer, max_tokens: int,
                  on_bad: str = "fail", show: int = 5) -> tuple[list[Example], RowReport]:
    def parse(row, where: str) -> Example:
        ids, mask = tokenizer.encode_chat(row_messages(row))
        if len(ids) > max_tokens:
            raise ValueError(f"too long ({len(ids)} tokens, limit {max_tokens})")
        return Example(ids, mask, where)

    return read_rows(paths, parse, "SFT", on_bad, show, hint=_HINT)


def check_sft_rows(paths: list[str], on_bad: str = "fail", show: int = 5) -> RowReport:
    """Every row decoded, parsed and checked against the row schema, without a tokenizer (the
    launcher's check before any process starts; lengths are checked when the stage tokenises)."""
    return read_rows(paths, lambda row, where: row_messages(row), "SFT", on_bad, show, hint=_HINT)[1]
