"""config.json of Hugging Face BailingMoe directories and the files that travel with it.

The architecture is read from and written to config.json here; an export also carries its source
directory's own side files (tokenizer, generation config, the modeling code its `auto_map`
names) and the source config's other keys, so that the exported directory loads the way the
source did. No tensors here, and no torch: the launcher reads configs before any process starts.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

from megatron_ring.models.presets import LingArch

# Files of an HF model directory, besides config and weights, that a user loading it needs:
# tokenizer (fast, sentencepiece or BPE files), chat template, generation defaults, and the
# remote code (modeling_*.py, configuration_*.py, tokenization_*.py and what they import).
AUX_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                "chat_template*", "generation_config.json", "*.py")
DTYPES = ("bfloat16", "float16", "float32")


class CheckpointError(ValueError):
    """A checkpoint that does not match what it is loaded into."""


def is_hf_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def arch_from_config(config: dict, source: str = "config.json") -> LingArch:
    def need(key):
        if key not in config:
            raise CheckpointError(f"{source}: missing key {key!r}")
        return config[key]

    if config.get("model_type") != "bailing_moe":
        raise CheckpointError(f"{source}: model_type is {config.get('model_type')!r}, expected 'bailing_moe'")
    if config.get("first_k_dense_replace", 0) != 0:
        raise CheckpointError(f"{source}: first_k_dense_replace={config['first_k_dense_replace']} "
                              "(dense leading layers) is not supported: Ling-lite has 0")
    for flag in ("use_bias", "use_qkv_bias", "tie_word_embeddings"):
        if config.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not supported by the Ling architecture")
    if not config.get("norm_topk_prob", True):
        raise CheckpointError(f"{source}: norm_topk_prob=false is not supported (Ling renormalises top-k)")
    heads = need("num_attention_heads")
    return LingArch(
        hidden_size=need("hidden_size"),
        num_layers=need("num_hidden_layers"),
        num_attention_heads=heads,
        num_query_groups=need("num_key_value_heads"),
        head_dim=config.get("head_dim") or need("hidden_size") // heads,
        vocab_size=need("vocab_size"),
        num_experts=need("num_experts"),
        moe_topk=need("num_experts_per_tok"),
        moe_ffn_hidden_size=need("moe_intermediate_size"),
        shared_expert_ffn_hidden_size=need("moe_intermediate_size") * need("num_shared_experts"),
        max_position_embeddings=need("max_position_embeddings"),
        rms_norm_eps=need("rms_norm_eps"),
        rope_theta=float(need("rope_theta")),
        norm_head=bool(config.get("norm_head", False)),
        eos_token_id=config.get("eos_token_id", 0),
        pad_token_id=config.get("pad_token_id", 0),
    )


def config_from_arch(arch: LingArch, dtype="bfloat16") -> dict:
    """The config.json of an architecture; dtype: a torch dtype or its name."""
    if arch.shared_expert_ffn_hidden_size % arch.moe_ffn_hidden_size:
        raise CheckpointError("shared expert width must be a multiple of the expert width in HF format")
    return {
        "architectures": ["BailingMoeForCausalLM"],
        "model_type": "bailing_moe",
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "num_experts": arch.num_experts,
        "num_experts_per_tok": arch.moe_topk,
        "moe_intermediate_size": arch.moe_ffn_hidden_size,
        "intermediate_size": arch.moe_ffn_hidden_size,
        "num_shared_experts": arch.shared_expert_ffn_hidden_size // arch.moe_ffn_hidden_size,
        "norm_topk_prob": True,
        "first_k_dense_replace": 0,
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta,
        "rope_scaling": None,
        "norm_head": arch.norm_head,
        "tie_word_embeddings": False,
        "use_bias": False,
        "use_qkv_bias": False,
        "hidden_act": "silu",
        "eos_token_id": arch.eos_token_id,
        "pad_token_id": arch.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def read_config(path: str | os.PathLike) -> dict:
    """The config.json of an HF directory, with errors naming the file."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return config


def source_dtype(source: str | os.PathLike | None) -> str | None:
    """The dtype an HF directory stores its weights in (its config's torch_dtype), if it says."""
    if not source or not is_hf_dir(source):
        return None
    config = read_config(source)
    dtype = config.get("torch_dtype") or config.get("dtype")
    return dtype if dtype in DTYPES else None


def aux_files(source: str | os.PathLike) -> list[Path]:
    """The side files of a source directory that an export carries (see AUX_PATTERNS)."""
    return sorted(p for p in Path(source).iterdir()
                  if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in AUX_PATTERNS))


def export_config(arch: LingArch, dtype, source: str | os.PathLike | None = None) -> dict:
    """config.json of an export: the architecture's keys over the source config's others (its
    auto_map above all, which points transformers at the carried modeling code)."""
    carried = {}
    if source and is_hf_dir(source):
        carried = {k: v for k, v in read_config(source).items() if k not in ("torch_dtype", "dtype")}
    return {**carried, **config_from_arch(arch, dtype)}


def copy_aux(source: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy the source's side files into dest; returns their names."""
    names = []
    for f in aux_files(source):
        target = Path(dest) / f.name
        if not (target.exists() and os.path.samefile(f, target)):  # an export over its own source
            shutil.copyfile(f, target)
        names.append(f.name)
    return names
