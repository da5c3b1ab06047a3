"""Megatron layer specs for Ling: the Transformer-Engine spec when TE imports, else the local one."""

from __future__ import annotations

import importlib

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_ring.models.norm import RMSNorm


def have_transformer_engine() -> bool:
    try:
        importlib.import_module("transformer_engine")  # optional: absent, or failing to load, on CPU machines
    except Exception:
        return False
    return True


def te_by_default() -> bool:
    """Transformer Engine layers wherever TE imports and a GPU is there to run them."""
    return have_transformer_engine() and torch.cuda.is_available()


def ling_block_spec(arch, use_te: bool | None = None) -> TransformerBlockSubmodules:
    """Every Ling layer is the same MoE layer; the block ends in a final RMSNorm."""
    if use_te is None:
        use_te = have_transformer_engine()
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm  # optional: only with transformer-engine

        layer = get_gpt_layer_with_transformer_engine_spec(
            num_experts=arch.num_experts, moe_grouped_gemm=True
        )
        final_norm = TENorm
    else:
        layer = get_gpt_layer_local_spec(
            num_experts=arch.num_experts, moe_grouped_gemm=False, normalization="RMSNorm"
        )
        layer.submodules.input_layernorm = RMSNorm
        layer.submodules.pre_mlp_layernorm = RMSNorm
        final_norm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * arch.num_layers, layer_norm=final_norm)
