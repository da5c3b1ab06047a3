"""Ling architecture presets: the facts of a Ling (HF BailingMoe) model, independent of layout."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class LingArch:
    """One Ling-architecture model: every layer MoE, GQA attention, RMSNorm, RoPE, SwiGLU."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    num_experts: int
    moe_topk: int
    moe_ffn_hidden_size: int
    shared_expert_ffn_hidden_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 600_000.0
    norm_head: bool = False
    eos_token_id: int = 0
    pad_token_id: int = 0

    def replace(self, **changes) -> "LingArch":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise KeyError(f"unknown LingArch field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, LingArch] = {
    # Ling-lite / Ling-lite-1.5 (HF BailingMoeForCausalLM): 16.8B total, 2.75B active.
    "ling-lite": LingArch(
        hidden_size=2048,
        num_layers=28,
        num_attention_heads=16,
        num_query_groups=4,
        head_dim=128,
        vocab_size=126_464,
        num_experts=64,
        moe_topk=6,
        moe_ffn_hidden_size=1408,
        shared_expert_ffn_hidden_size=2816,
        max_position_embeddings=32_768,
        eos_token_id=126_081,
        pad_token_id=126_081,
    ),
    # The same kinds of parts, small enough to train on two CPU cores. The vocabulary is not a
    # multiple of 128 on purpose, so that TP vocab padding and unpadding are always exercised.
    "ling-tiny": LingArch(
        hidden_size=128,
        num_layers=3,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=32,
        vocab_size=1000,
        num_experts=8,
        moe_topk=2,
        moe_ffn_hidden_size=96,
        shared_expert_ffn_hidden_size=192,
        max_position_embeddings=2048,
        rope_theta=10_000.0,
        eos_token_id=1,
        pad_token_id=1,
    ),
}


def get_preset(name: str) -> LingArch:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}") from None
