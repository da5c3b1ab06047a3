"""SFT rows: a conversation per row, tokenised with loss on the responses only; bad rows are handled
by jsonl_rows (counted, named, skip or fail).

Row forms: a message list under `messages_key` (data.messages_key; "messages" in the released
Ring-lite SFT set), each message {role, content} (or ShareGPT's {from, value}), its role a name
of `roles` (data.roles: row role -> system|user|assistant, over the defaults system/user/assistant
and Ling's SYSTEM/HUMAN/ASSISTANT); or {"prompt", "response"}."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ring.data.chat_tokenizer import ChatTokenizer
from megatron_ring.data.jsonl_rows import DataError, RowReport, read_rows

__all__ = ["DataError", "Example", "RowReport", "check_sft_rows", "read_sft_rows", "role_map", "row_messages"]

ROLES = ("system", "user", "assistant")
DEFAULT_ROLES = {**{r: r for r in ROLES}, "SYSTEM": "system", "HUMAN": "user", "ASSISTANT": "assistant"}


@dataclass
class Example:
    ids: list[int]
    loss_mask: list[int]
    source: str  # file:line


def role_map(roles: dict | None = None) -> dict[str, str]:
    """The row role names this data may use -> system|user|assistant; DataError names a wrong one."""
    for name, role in (roles or {}).items():
        if role not in ROLES:
            raise DataError(f"data.roles: {name!r} maps to {role!r}, not one of {'|'.join(ROLES)}")
    return {**DEFAULT_ROLES, **(roles or {})}


def _field(message: dict, keys: tuple[str, str]):
    return message[keys[0]] if keys[0] in message else message.get(keys[1])


def row_messages(row, messages_key: str = "messages", roles: dict | None = None) -> list[dict]:
    """The conversation of one row as [{role: system|user|assistant, content}]; ValueError says
    which key or role is wrong. `roles`: data.roles (row role -> system|user|assistant)."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if messages_key in row:
        mapping = role_map(roles)
        messages = row[messages_key]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"'{messages_key}' must be a non-empty list of messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ValueError(f"{messages_key}[{i}] must be an object {{role, content}}, got {type(m).__name__}")
            name, content = _field(m, ("role", "from")), _field(m, ("content", "value"))
            if name is None:
                raise ValueError(f"{messages_key}[{i}] has no 'role' (or 'from')")
            if not isinstance(name, str) or name not in mapping:
                raise ValueError(f"{messages_key}[{i}]: role {name!r} is not one of {sorted(mapping)} "
                                 "(map it with data.roles)")
            if not isinstance(content, str):
                raise ValueError(f"{messages_key}[{i}]: 'content' (or 'value') must be a string, "
                                 f"got {type(content).__name__}")
            out.append({"role": mapping[name], "content": content})
        answers = [m for m in out if m["role"] == "assistant"]
        if not answers:
            raise ValueError(f"no assistant message (in '{messages_key}')")
        if not all(m["content"].strip() for m in answers):
            raise ValueError("empty response")
        return out
    if "prompt" in row or "response" in row:
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"missing or non-string '{key}'")
        if not row["response"].strip():
            raise ValueError("empty response")
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    raise ValueError(f"missing '{messages_key}' (data.messages_key) or 'prompt' and 'response'")


_HINT = " (set data.bad_rows=skip to skip them)"


def read_sft_rows(paths: list[str], tokenizer: ChatTokenizer, max_tokens: int,
                  on_bad: str = "fail", show: int = 5, *, messages_key: str = "messages",
                  roles: dict | None = None) -> tuple[list[Example], RowReport]:
    mapping = role_map(roles)

    def parse(row, where: str) -> Example:
        ids, mask = tokenizer.encode_chat(row_messages(row, messages_key, mapping))
        if len(ids) > max_tokens:
            raise ValueError(f"too long ({len(ids)} tokens, limit {max_tokens})")
        return Example(ids, mask, where)

    return read_rows(paths, parse, "SFT", on_bad, show, hint=_HINT)


def check_sft_rows(paths: list[str], on_bad: str = "fail", show: int = 5, *, messages_key: str = "messages",
                   roles: dict | None = None) -> RowReport:
    """Every row decoded, parsed and checked against the row schema, without a tokenizer (the
    launcher's check before any process starts; lengths are checked when the stage tokenises)."""
    mapping = role_map(roles)
    return read_rows(paths, lambda row, where: row_messages(row, messages_key, mapping), "SFT", on_bad, show,
                     hint=_HINT)[1]
