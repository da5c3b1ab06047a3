"""HF BailingMoe <-> Megatron weight conversion for any TP/EP layout, one tensor at a time.

Three forms of a weight:
- HF: names and shapes of the published checkpoint (model.layers.{i}.attention.query_key_value...).
- full Megatron: Megatron names, unsharded, vocabulary padded for the layout's TP size,
  QKV interleaved per query group ([q x heads_per_group, k, v] for each group), SwiGLU fc1 as
  [gate; up].
- local: what one rank holds: TP-sharded along the layer's partition dim, routed experts split
  across EP ranks (experts are not tensor-parallel, expert_tensor_parallel_size=1).
Every conversion is per tensor so that a 16.8B export streams instead of gathering all weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_ring.models.presets import LingArch

# Transformer-Engine spec names -> the local spec's names used below.
_TE_ALIASES = [
    (re.compile(r"(.*)\.self_attention\.linear_qkv\.layer_norm_weight$"), r"\1.input_layernorm.weight"),
    (re.compile(r"(.*)\.mlp\.experts\.linear_fc(\d)\.weight(\d+)$"), r"\1.mlp.experts.local_experts.\3.linear_fc\2.weight"),
]


def canonical_name(name: str) -> str:
    """The local-spec name of a parameter (TE's fused-norm and grouped-GEMM names mapped)."""
    name = name.removeprefix("module.")
    for pattern, repl in _TE_ALIASES:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return name


@dataclass(frozen=True)
class Sharding:
    tp_dim: int | None = None  # dimension split across TP ranks, None if replicated
    gated: bool = False  # [gate; up] halves are split separately
    expert: bool = False  # split across EP ranks by expert index


_LAYER = r"decoder\.layers\.(\d+)\."
_RULES: list[tuple[re.Pattern, Sharding]] = [
    (re.compile(r"embedding\.word_embeddings\.weight$"), Sharding(tp_dim=0)),
    (re.compile(r"output_layer\.weight$"), Sharding(tp_dim=0)),
    (re.compile(r"decoder\.final_layernorm\.weight$"), Sharding()),
    (re.compile(_LAYER + r"input_layernorm\.weight$"), Sharding()),
    (re.compile(_LAYER + r"pre_mlp_layernorm\.weight$"), Sharding()),
    (re.compile(_LAYER + r"self_attention\.linear_qkv\.weight$"), Sharding(tp_dim=0)),
    (re.compile(_LAYER + r"self_attention\.linear_proj\.weight$"), Sharding(tp_dim=1)),
    (re.compile(_LAYER + r"mlp\.router\.weight$"), Sharding()),
    (re.compile(_LAYER + r"mlp\.shared_experts\.linear_fc1\.weight$"), Sharding(tp_dim=0, gated=True)),
    (re.compile(_LAYER + r"mlp\.shared_experts\.linear_fc2\.weight$"), Sharding(tp_dim=1)),
    (re.compile(_LAYER + r"mlp\.experts\.local_experts\.(\d+)\.linear_fc[12]\.weight$"), Sharding(expert=True)),
]


def sharding_of(name: str) -> Sharding:
    name = canonical_name(name)
    for pattern, sharding in _RULES:
        if pattern.match(name):
            return sharding
    raise KeyError(f"no conversion rule for Megatron parameter {name!r}")


def with_global_expert(name: str, ep_rank: int, local_experts: int) -> str:
    """decoder...local_experts.{j}... on EP rank r -> the same name with the global expert index."""
    name = canonical_name(name)
    m = re.search(r"local_experts\.(\d+)\.", name)
    if not m:
        return name
    e = ep_rank * local_experts + int(m.group(1))
    return name[: m.start(1)] + str(e) + name[m.end(1):]


# ---------------------------------------------------------------- full Megatron <-> local shard


def shard(full: torch.Tensor, sharding: Sharding, tp_rank: int, tp: int) -> torch.Tensor:
    """The TP shard of a full Megatron tensor (experts are picked by name, not sliced)."""
    if sharding.tp_dim is None or tp == 1:
        return full
    if sharding.gated:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=sharding.tp_dim)[tp_rank]


def unshard(pieces: list[torch.Tensor], sharding: Sharding) -> torch.Tensor:
    """Inverse of `shard` given every TP rank's piece in rank order."""
    if sharding.tp_dim is None or len(pieces) == 1:
        return pieces[0]
    if sharding.gated:
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(pieces, dim=sharding.tp_dim)


# ------------------------------------------------------------------------ HF <-> full Megatron


def expected_hf_shapes(arch: LingArch) -> dict[str, tuple[int, ...]]:
    """Every tensor a BailingMoe checkpoint of this architecture must hold, with its shape."""
    H, hd = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    f, fs = arch.moe_ffn_hidden_size, arch.shared_expert_ffn_hidden_size
    shapes = {"model.word_embeddings.weight": (arch.vocab_size, H),
              "model.norm.weight": (H,),
              "lm_head.weight": (arch.vocab_size, H)}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,),
            p + "attention.query_key_value.weight": (q + 2 * kv, H),
            p + "attention.dense.weight": (H, q),
            p + "post_attention_layernorm.weight": (H,),
            p + "mlp.gate.weight": (arch.num_experts, H),
            p + "mlp.shared_experts.gate_proj.weight": (fs, H),
            p + "mlp.shared_experts.up_proj.weight": (fs, H),
            p + "mlp.shared_experts.down_proj.weight": (H, fs),
        })
        for e in range(arch.num_experts):
            pe = p + f"mlp.experts.{e}."
            shapes.update({pe + "gate_proj.weight": (f, H), pe + "up_proj.weight": (f, H),
                           pe + "down_proj.weight": (H, f)})
    return shapes


def _qkv_hf_to_megatron(w: torch.Tensor, arch: LingArch) -> torch.Tensor:
    g, hd, H = arch.num_query_groups, arch.head_dim, arch.hidden_size
    per_group = arch.num_attention_heads // g * hd
    q, k, v = w.split([g * per_group, g * hd, g * hd], dim=0)
    grouped = torch.cat([q.reshape(g, per_group, H), k.reshape(g, hd, H), v.reshape(g, hd, H)], dim=1)
    return grouped.reshape(-1, H)


def _qkv_megatron_to_hf(w: torch.Tensor, arch: LingArch) -> torch.Tensor:
    g, hd, H = arch.num_query_groups, arch.head_dim, arch.hidden_size
    per_group = arch.num_attention_heads // g * hd
    q, k, v = w.reshape(g, per_group + 2 * hd, H).split([per_group, hd, hd], dim=1)
    return torch.cat([q.reshape(-1, H), k.reshape(-1, H), v.reshape(-1, H)], dim=0)


def _pad_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    if w.shape[0] == rows:
        return w
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])], dim=0)


_SIMPLE = {  # full Megatron suffix -> HF suffix, same tensor
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "attention.dense.weight",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.shared_experts.linear_fc2.weight": "mlp.shared_experts.down_proj.weight",
}
_LAYER_RE = re.compile(r"decoder\.layers\.(\d+)\.(.*)$")
_EXPERT_RE = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")


def hf_sources(name: str) -> list[str]:
    """The HF tensors one full Megatron tensor is made of."""
    if name == "embedding.word_embeddings.weight":
        return ["model.word_embeddings.weight"]
    if name == "output_layer.weight":
        return ["lm_head.weight"]
    if name == "decoder.final_layernorm.weight":
        return ["model.norm.weight"]
    m = _LAYER_RE.match(name)
    if not m:
        raise KeyError(f"no HF mapping for Megatron parameter {name!r}")
    p, rest = f"model.layers.{m.group(1)}.", m.group(2)
    if rest in _SIMPLE:
        return [p + _SIMPLE[rest]]
    if rest == "self_attention.linear_qkv.weight":
        return [p + "attention.query_key_value.weight"]
    if rest == "mlp.shared_experts.linear_fc1.weight":
        return [p + "mlp.shared_experts.gate_proj.weight", p + "mlp.shared_experts.up_proj.weight"]
    em = _EXPERT_RE.match(rest)
    if em:
        pe = p + f"mlp.experts.{em.group(1)}."
        return [pe + "gate_proj.weight", pe + "up_proj.weight"] if em.group(2) == "1" else [pe + "down_proj.weight"]
    raise KeyError(f"no HF mapping for Megatron parameter {name!r}")


def from_hf(name: str, read: Callable[[str], torch.Tensor], arch: LingArch, padded_vocab: int) -> torch.Tensor:
    """Full Megatron tensor `name` from HF tensors fetched by `read(hf_name)`."""
    sources = [read(s) for s in hf_sources(name)]
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return _pad_rows(sources[0], padded_vocab)
    if name.endswith("linear_qkv.weight"):
        return _qkv_hf_to_megatron(sources[0], arch)
    return sources[0] if len(sources) == 1 else torch.cat(sources, dim=0)


def to_hf(name: str, full: torch.Tensor, arch: LingArch) -> dict[str, torch.Tensor]:
    """HF tensors from full Megatron tensor `name` (vocabulary padding removed)."""
    targets = hf_sources(name)
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return {targets[0]: full[: arch.vocab_size]}
    if name.endswith("linear_qkv.weight"):
        return {targets[0]: _qkv_megatron_to_hf(full, arch)}
    if len(targets) == 2:
        return dict(zip(targets, full.chunk(2, dim=0)))
    return {targets[0]: full}
