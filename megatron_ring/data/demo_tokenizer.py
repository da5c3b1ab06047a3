"""A small byte-level BPE tokenizer for the demo data, in Hugging Face format.

Byte-level so that any text (code indentation, newlines) decodes back exactly; digits split one
per token so that the arithmetic a tiny model learns is over digits, not over arbitrary merges.
The special tokens come first so their ids are fixed: <unk>=0, <|endoftext|>=1 (eos and pad, as
in the ling-tiny preset), <role>=2, </role>=3. The chat template is Ling's, written in plain
jinja2 with whitespace control on every tag so that it renders the same with or without
transformers' trim_blocks/lstrip_blocks."""

from __future__ import annotations

import functools
import json
from typing import Iterable

import jinja2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<unk>", "<|endoftext|>", "<role>", "</role>")
UNK, EOS = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1]
MODEL_MAX_LENGTH = 2048  # ling-tiny's max_position_embeddings

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<role>SYSTEM</role>{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}<role>HUMAN</role>{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}<role>ASSISTANT</role>{{ message['content'] }}<|endoftext|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<role>ASSISTANT</role>{%- endif -%}"
)


@functools.lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    return jinja2.Environment().from_string(CHAT_TEMPLATE)


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    return _template().render(messages=messages, add_generation_prompt=add_generation_prompt)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> Tokenizer:
    """BPE over bytes with digits isolated; deterministic for the same texts in the same order."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, f"special token {token} got id {tok.token_to_id(token)}, not {i}"
    return tok


def tokenizer_files(tok: Tokenizer) -> dict[str, str]:
    """The contents of a Hugging Face tokenizer directory (file name -> text)."""
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": UNK,
        "additional_special_tokens": list(SPECIAL_TOKENS[2:]),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }
    special_map = {"eos_token": EOS, "pad_token": EOS, "unk_token": UNK,
                   "additional_special_tokens": list(SPECIAL_TOKENS[2:])}
    return {
        "tokenizer.json": tok.to_str(pretty=True) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special_map, indent=2) + "\n",
    }
