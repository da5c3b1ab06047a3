"""Ling's chat template, built in: used when a tokenizer directory has none (`data.chat_template:
auto`) or when the recipe names it (`ling`).

What the released template is. inclusionAI/Ling-lite's tokenizer_config.json `chat_template`, as
llama.cpp's tests/test-chat-template.cpp quotes it (test case "inclusionAI/Ling-lite"):

    {% for message in messages %}{% set role = message['role'] | lower %}{% if role == 'user' %}
    {% set role = 'HUMAN' %}{% endif %}{% set role = role | upper %}{{ '<role>' + role + '</role>'
    + message['content'] }}{% endfor %}{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}
    {% endif %}

(one line in the file). Each message is `<role>ROLE</role>` + its content, ROLE its role upper-cased
with user named HUMAN; nothing between turns; `<role>ASSISTANT</role>` opens the answer. The
template appends NO eos after an assistant turn: the eos `<|endoftext|>` (id 126081 in Ling-lite)
is left to the trainer, as ms-swift's `ling` template does (suffix `<|endoftext|>`, empty
chat_sep). So ChatTokenizer.encode_chat appends the eos after every assistant turn whose template
text lacks it, with loss on it: the model must learn to stop, and rollouts stop at the eos id.

LING_CHAT_TEMPLATE below is our own jinja string with that behaviour (whitespace control on every
tag, so it renders the same with or without transformers' trim_blocks/lstrip_blocks);
tests/test_ling_chat.py checks it against the released string."""

from __future__ import annotations

LING_EOS = "<|endoftext|>"

LING_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set role = message['role'] | lower -%}"
    "<role>{{ 'HUMAN' if role == 'user' else role | upper }}</role>{{ message['content'] }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<role>ASSISTANT</role>{%- endif -%}"
)
