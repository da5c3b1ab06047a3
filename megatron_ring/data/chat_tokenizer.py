"""A Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json with its chat
template), used for training rows and for prompts alike so both see the same token boundaries.

Only the `tokenizers` library and jinja2 are needed (no transformers): the chat template is
rendered the way transformers renders it, and each turn is tokenised on its own so that the
tokens of a response are exactly the tokens the model must produce after the prompt."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class TokenizerError(ValueError):
    pass


def _special(config: dict, key: str):
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


class ChatTokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        files = {name: self.path / name for name in ("tokenizer.json", "tokenizer_config.json")}
        for name, f in files.items():
            if not f.is_file():
                raise TokenizerError(f"{self.path}: no {name} (expected a Hugging Face tokenizer directory)")
        self.tokenizer = Tokenizer.from_file(str(files["tokenizer.json"]))
        try:
            self.config = json.loads(files["tokenizer_config.json"].read_text())
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{files['tokenizer_config.json']}: invalid JSON ({e})") from None
        self.eos_token = _special(self.config, "eos_token")
        if not self.eos_token:
            raise TokenizerError(f"{files['tokenizer_config.json']}: no eos_token")
        self.eos_id = self._id(self.eos_token)
        self.pad_id = self._id(_special(self.config, "pad_token") or self.eos_token)
        template = self.config.get("chat_template")
        if not template:
            raise TokenizerError(f"{files['tokenizer_config.json']}: no chat_template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(template)

    def _id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.path}: special token {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    eos_token=self.eos_token, bos_token=_special(self.config, "bos_token") or "")

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Tokens that end with the assistant header, ready for the model to answer."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(ids, loss_mask): loss on every assistant turn (including its end-of-turn token),
        none on system/user text or the template's headers."""
        ids: list[int] = []
        mask: list[int] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                header = self.render(messages[:i], add_generation_prompt=True)
                self._extend(ids, mask, done, header, 0)
                done = header
            full = self.render(messages[: i + 1])
            self._extend(ids, mask, done, full, int(message["role"] == "assistant"))
            done = full
        return ids, mask

    def _extend(self, ids, mask, done: str, text: str, label: int) -> None:
        if not text.startswith(done):
            raise TokenizerError(f"{self.path}: the chat template does not render conversations "
                                 "incrementally (a prefix changed when a turn was added)")
        piece = self.encode(text[len(done):])
        ids.extend(piece)
        mask.extend([label] * len(piece))
