"""Ling's built-in chat template (renders as the released Ling-lite template does), SFT encoding
with it (loss on assistant turns and the eos appended after each), the data.chat_template choice,
and SFT row forms mapped by data.messages_key / data.roles."""

import json
from types import SimpleNamespace

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, models, pre_tokenizers

from megatron_ring.data.chat_tokenizer import ChatTokenizer, TokenizerError
from megatron_ring.data.ling_chat import LING_CHAT_TEMPLATE, LING_EOS
from megatron_ring.data.sft_rows import DataError, check_sft_rows, read_sft_rows, role_map, row_messages
from megatron_ring.train import stage_setup

# inclusionAI/Ling-lite's tokenizer_config.json chat_template, as llama.cpp's
# tests/test-chat-template.cpp quotes it (the reference our own template must render like).
RELEASED_LING_LITE_TEMPLATE = (
    "{% for message in messages %}{% set role = message['role'] | lower %}{% if role == 'user' %}"
    "{% set role = 'HUMAN' %}{% endif %}{% set role = role | upper %}"
    "{{ '<role>' + role + '</role>' + message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "And 2+4?"},
    {"role": "assistant", "content": "It is 6."},
]
RENDERED = ("<role>SYSTEM</role>You are brief.<role>HUMAN</role>What is 2+3?<role>ASSISTANT</role>It is 5."
            "<role>HUMAN</role>And 2+4?<role>ASSISTANT</role>It is 6.")

# A small Ling-style tokenizer: whole words, the role tags and the eos as special tokens.
VOCAB = ["<unk>", LING_EOS, "<role>", "</role>", "SYSTEM", "HUMAN", "ASSISTANT", "You", "are", "brief", ".",
         "What", "is", "2", "+", "3", "?", "It", "5", "And", "4", "6", "system", "user", "assistant"]
ID = {t: i for i, t in enumerate(VOCAB)}
# a directory template that ends assistant turns with the eos itself (as the demo tokenizer's does)
EOS_TEMPLATE = ("{% for m in messages %}<role>{{ m['role'] }}</role>{{ m['content'] }}"
                "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<role>assistant</role>{% endif %}")


def ling_style_tokenizer(path, chat_template=None, jinja_file=None):
    tok = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([LING_EOS, "<role>", "</role>"])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": LING_EOS, "pad_token": LING_EOS,
              "unk_token": "<unk>", "additional_special_tokens": ["<role>", "</role>"]}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja_file is not None:
        (path / "chat_template.jinja").write_text(jinja_file)
    return path


def render(template: str, messages, add_generation_prompt=False, hf_style=True) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) if hf_style else jinja2.Environment()
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("messages", [
    CONVERSATION,
    CONVERSATION[:2],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "   I am an assistant   "},
     {"role": "User", "content": "line one\n  line two\n"}],
    [{"role": "system", "content": ""}, {"role": "tool", "content": "{\"x\": 1}"}, {"role": "user", "content": "ok"}],
])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_builtin_template_renders_as_the_released_one(messages, add_generation_prompt):
    want = render(RELEASED_LING_LITE_TEMPLATE, messages, add_generation_prompt)
    for hf_style in (True, False):
        assert render(LING_CHAT_TEMPLATE, messages, add_generation_prompt, hf_style) == want


def test_conversation_renders_and_tokenises_exactly(tmp_path):
    assert render(RELEASED_LING_LITE_TEMPLATE, CONVERSATION) == RENDERED
    tok = ChatTokenizer(ling_style_tokenizer(tmp_path / "tok"))  # no chat_template: Ling's (auto)
    assert (tok.template_source, tok.append_eos, tok.eos_id) == ("ling", True, 1)
    assert tok.render(CONVERSATION) == RENDERED
    assert tok.render(CONVERSATION[:2], add_generation_prompt=True) == RENDERED[:RENDERED.index("It is 5.")]
    ids, mask = tok.encode_chat(CONVERSATION)
    tokens = ["<role>", "SYSTEM", "</role>", "You", "are", "brief", ".",
              "<role>", "HUMAN", "</role>", "What", "is", "2", "+", "3", "?",
              "<role>", "ASSISTANT", "</role>", "It", "is", "5", ".", "<|endoftext|>",
              "<role>", "HUMAN", "</role>", "And", "2", "+", "4", "?",
              "<role>", "ASSISTANT", "</role>", "It", "is", "6", ".", "<|endoftext|>"]
    assert ids == [2, 4, 3, 7, 8, 9, 10, 2, 5, 3, 11, 12, 13, 14, 15, 16, 2, 6, 3, 17, 12, 18, 10, 1,
                   2, 5, 3, 19, 13, 14, 20, 16, 2, 6, 3, 17, 12, 21, 10, 1]
    assert ids == [ID[t] for t in tokens]
    assert mask == [0] * 19 + [1] * 5 + [0] * 11 + [1] * 5  # assistant content and its eos only
    prompt = tok.encode_prompt(CONVERSATION[:2])
    assert ids[:len(prompt)] == prompt and prompt[-3:] == [2, 6, 3]


def test_chat_template_choices(tmp_path):
    bare = ling_style_tokenizer(tmp_path / "bare")
    own = ling_style_tokenizer(tmp_path / "own", chat_template=EOS_TEMPLATE)
    tok = ChatTokenizer(own)  # auto: the directory's template, which ends turns with the eos itself
    assert (tok.template_source, tok.append_eos) == ("tokenizer", False)
    ids, mask = tok.encode_chat(CONVERSATION)
    assert ids.count(1) == 2 and [i for i, m in zip(ids, mask) if m] == [17, 12, 18, 10, 1, 17, 12, 21, 10, 1]
    assert ids[:4] == [2, ID["system"], 3, ID["You"]]
    assert ChatTokenizer(own, "tokenizer").render(CONVERSATION) == tok.render(CONVERSATION)
    ling = ChatTokenizer(own, "ling")  # Ling's even though the directory has one
    assert ling.template_source == "ling" and ling.render(CONVERSATION) == RENDERED
    assert ling.encode_chat(CONVERSATION) == ChatTokenizer(bare).encode_chat(CONVERSATION)
    with pytest.raises(TokenizerError, match=r"bare/tokenizer_config.json: no chat_template .*data.chat_template "
                                             r"is 'tokenizer'.*'auto' or 'ling'"):
        ChatTokenizer(bare, "tokenizer")
    with pytest.raises(TokenizerError, match="chat_template must be one of auto|ling|tokenizer, got 'chatml'"):
        ChatTokenizer(bare, "chatml")
    jinja = ChatTokenizer(ling_style_tokenizer(tmp_path / "jinja", jinja_file=EOS_TEMPLATE), "tokenizer")
    assert jinja.render(CONVERSATION) == tok.render(CONVERSATION)  # chat_template.jinja beside the config


def test_load_tokenizer_passes_the_recipe_choice(tmp_path):
    path = ling_style_tokenizer(tmp_path / "tok", chat_template=EOS_TEMPLATE)
    arch = SimpleNamespace(vocab_size=64, eos_token_id=1)

    def recipe(choice):
        return SimpleNamespace(data=SimpleNamespace(tokenizer=str(path), chat_template=choice),
                               model=SimpleNamespace(preset="test"))

    assert stage_setup.load_tokenizer(recipe("ling"), tmp_path, arch).render(CONVERSATION) == RENDERED
    assert stage_setup.load_tokenizer(recipe("auto"), tmp_path, arch).template_source == "tokenizer"
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": LING_EOS}))
    with pytest.raises(TokenizerError, match="no chat_template"):
        stage_setup.load_tokenizer(recipe("tokenizer"), tmp_path, arch)


def test_row_forms_map_to_messages():
    want = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert row_messages({"messages": want}) == want  # the released Ring-lite SFT form
    ling_names = [{"role": "SYSTEM", "content": "s"}, {"role": "HUMAN", "content": "q"},
                  {"role": "ASSISTANT", "content": "a"}]
    assert row_messages({"messages": ling_names}) == [{"role": "system", "content": "s"}, *want]
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert row_messages(sharegpt, "conversations", {"human": "user", "gpt": "assistant"}) == want
    assert row_messages({"prompt": "q", "response": "a"}, "conversations") == want


@pytest.mark.parametrize("row, key, roles, error", [
    ({"messages": []}, "conversations", None, r"missing 'conversations' \(data.messages_key\)"),
    ({"conversations": {"a": 1}}, "conversations", None, "'conversations' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "gpt", "content": "a"}]}, "messages", None,
     r"messages\[1\]: role 'gpt' is not one of .*\(map it with data.roles\)"),
    ({"messages": [{"content": "q"}]}, "messages", None, r"messages\[0\] has no 'role' \(or 'from'\)"),
    ({"messages": [{"role": "user", "content": ["q"]}]}, "messages", None,
     r"messages\[0\]: 'content' \(or 'value'\) must be a string, got list"),
    ({"messages": [{"role": "bot", "content": "q"}]}, "messages", {"bot": "model"},
     "data.roles: 'bot' maps to 'model', not one of system|user|assistant"),
    ({"messages": [{"role": "human", "content": "q"}]}, "messages", {"human": "user"},
     r"no assistant message \(in 'messages'\)"),
])
def test_row_form_errors_name_the_key_or_role(row, key, roles, error):
    with pytest.raises(ValueError, match=error):
        row_messages(row, key, roles)


def test_sft_rows_read_with_messages_key_and_roles(tmp_path):
    tok = ChatTokenizer(ling_style_tokenizer(tmp_path / "tok"))
    roles = {"human": "user", "gpt": "assistant"}
    f = tmp_path / "sft.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"conversations": [{"from": "human", "value": "What is 2+3?"}, {"from": "gpt", "value": "It is 5."}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
    ]) + "\n")
    examples, report = read_sft_rows([str(f)], tok, 64, "skip", messages_key="conversations", roles=roles)
    assert (examples[0].ids, examples[0].loss_mask) == tok.encode_chat(CONVERSATION[1:3])
    assert report.first == [(f"{f}:2: conversations[1]: role 'bot' is not one of "
                             f"{sorted(role_map(roles))} (map it with data.roles)")]
    assert check_sft_rows([str(f)], "skip", messages_key="conversations", roles=roles).kept == 1
    with pytest.raises(DataError, match=rf"{f}:1: missing 'messages' \(data.messages_key\)"):
        check_sft_rows([str(f)])  # the default key
    with pytest.raises(DataError, match="data.roles: 'gpt' maps to 'assistent'"):
        check_sft_rows([str(f)], messages_key="conversations", roles={"gpt": "assistent"})
