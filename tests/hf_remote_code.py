"""A source HF directory as a hub download has it, for export tests: weights, config.json with
an auto_map, remote modeling code, tokenizer files, generation config.

The official BailingMoe code is not available here (and is not ours to copy), so the remote code
is a small one written here: a PreTrainedModel whose parameters carry the HF names and shapes
and whose forward is tests/hf_reference.py's (its text is copied into the file, so the code is
self-contained the way downloaded remote code is)."""

import json
from pathlib import Path

from megatron_ring.data.demo_tokenizer import tokenizer_files, train_tokenizer
from tests.conftest import ROOT, write_random_hf

CONFIGURATION = '''
from transformers import PretrainedConfig


class BailingMoeConfig(PretrainedConfig):
    model_type = "bailing_moe"
'''

MODEL = '''

# ---- the test's remote code: parameters under the HF names, the forward above ----
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_bailing_moe import BailingMoeConfig


def _module(**children):
    m = nn.Module()
    for name, child in children.items():
        setattr(m, name, child)
    return m


def _linear(n_in, n_out):
    return nn.Linear(n_in, n_out, bias=False)


def _ffn(hidden, width):
    return _module(gate_proj=_linear(hidden, width), up_proj=_linear(hidden, width), down_proj=_linear(width, hidden))


class _Norm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))


class BailingMoeForCausalLM(PreTrainedModel):
    config_class = BailingMoeConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        c = config
        h, hd = c.hidden_size, c.head_dim or c.hidden_size // c.num_attention_heads
        qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * hd
        layers = [_module(
            input_layernorm=_Norm(h),
            attention=_module(query_key_value=_linear(h, qkv), dense=_linear(c.num_attention_heads * hd, h)),
            post_attention_layernorm=_Norm(h),
            mlp=_module(gate=_linear(h, c.num_experts),
                        experts=nn.ModuleList(_ffn(h, c.moe_intermediate_size) for _ in range(c.num_experts)),
                        shared_experts=_ffn(h, c.moe_intermediate_size * c.num_shared_experts)))
            for _ in range(c.num_hidden_layers)]
        self.model = _module(word_embeddings=nn.Embedding(c.vocab_size, h), layers=nn.ModuleList(layers), norm=_Norm(h))
        self.lm_head = _linear(h, c.vocab_size)
        self.post_init()

    def forward(self, input_ids, **kwargs):
        weights = {name: p.detach() for name, p in self.named_parameters()}
        return CausalLMOutput(logits=hf_forward(weights, self.config.to_dict(), input_ids))
'''

AUTO_MAP = {"AutoConfig": "configuration_bailing_moe.BailingMoeConfig",
            "AutoModelForCausalLM": "modeling_bailing_moe.BailingMoeForCausalLM"}
GENERATION = {"eos_token_id": 1, "pad_token_id": 1, "do_sample": True, "temperature": 0.7}


def write_source(path: Path, arch) -> Path:
    """A source HF directory as a hub download has it: weights, config with auto_map, remote
    code, tokenizer (the demo tokenizer, whose ids match ling-tiny's), generation config."""
    write_random_hf(path, arch)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "auto_map": AUTO_MAP, "transformers_version": "x"}))
    (path / "configuration_bailing_moe.py").write_text(CONFIGURATION)
    (path / "modeling_bailing_moe.py").write_text((ROOT / "tests/hf_reference.py").read_text() + MODEL)
    tok = train_tokenizer(["Compute 12+30. The answer is \\boxed{42}."] * 20, vocab_size=arch.vocab_size)
    for name, text in tokenizer_files(tok).items():
        (path / name).write_text(text)
    (path / "generation_config.json").write_text(json.dumps(GENERATION))
    return path
