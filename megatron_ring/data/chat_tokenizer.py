"""A Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json with its chat
template), used for training rows and for prompts alike so both see the same token boundaries.

Only the `tokenizers` library and jinja2 are needed (no transformers): the chat template is
rendered the way transformers renders it, and each turn is tokenised on its own so that the
tokens of a response are exactly the tokens the model must produce after the prompt.

The template is the directory's or Ling's built-in one (`data/ling_chat.py`), chosen by
`data.chat_template`: auto (the directory's, Ling's when it has none), ling, tokenizer. A template
that ends assistant turns without the eos (Ling's) gets the eos appended after each of them, with
loss, so that the model learns to stop where generation stops."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from megatron_ring.data.ling_chat import LING_CHAT_TEMPLATE

TEMPLATE_CHOICES = ("auto", "ling", "tokenizer")


class TokenizerError(ValueError):
    pass


def _special(config: dict, key: str):
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _directory_template(path: Path, config: dict):
    """The directory's chat template: tokenizer_config.json's chat_template (a string, or the one
    named "default" of a list), else a chat_template.jinja file (as newer transformers save it)."""
    template = config.get("chat_template")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


class ChatTokenizer:
    def __init__(self, path: str | Path, chat_template: str = "auto"):
        """chat_template: auto (the directory's template, Ling's built-in one when it has none),
        ling (Ling's always), tokenizer (the directory's; an error when it has none)."""
        if chat_template not in TEMPLATE_CHOICES:
            raise TokenizerError(f"chat_template must be one of {'|'.join(TEMPLATE_CHOICES)}, got {chat_template!r}")
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
        template = None if chat_template == "ling" else _directory_template(self.path, self.config)
        if template is None and chat_template == "tokenizer":
            raise TokenizerError(f"{files['tokenizer_config.json']}: no chat_template (nor a chat_template.jinja "
                                 "beside it); data.chat_template is 'tokenizer', while 'auto' or 'ling' use "
                                 "Ling's built-in template")
        self.template_source = "tokenizer" if template else "ling"
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(template or LING_CHAT_TEMPLATE)
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerError(f"{files['tokenizer_config.json']}: chat_template does not parse ({e})") from None
        self.append_eos = not self._template_ends_turns()

    def _template_ends_turns(self) -> bool:
        """Whether the template itself writes the eos after an assistant turn (Ling's does not)."""
        probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        try:
            head, full = self.render(probe[:1], add_generation_prompt=True), self.render(probe)
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerError(f"{self.path}: the {self.template_source} chat template fails on a "
                                 f"user + assistant conversation ({e})") from None
        return self.eos_token in full[len(head):]

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
        """(ids, loss_mask): loss on every assistant turn and its eos (the template's, or appended
        when the template writes none), none on system/user text or the template's headers."""
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
            if message["role"] == "assistant" and self.append_eos:
                ids.append(self.eos_id)
                mask.append(1)
            done = full
        return ids, mask

    def _extend(self, ids, mask, done: str, text: str, label: int) -> None:
        if not text.startswith(done):
            raise TokenizerError(f"{self.path}: the chat template does not render conversations "
                                 "incrementally (a prefix changed when a turn was added)")
        piece = self.encode(text[len(done):])
        ids.extend(piece)
        mask.extend([label] * len(piece))
