"""The recipe's `train.recompute` as Megatron's TransformerConfig arguments, checked against the
model and the layer spec first, so that a setting Megatron would refuse deep inside model
construction (or silently ignore) is an error naming the recipe key. No torch: the launcher and
`megatron-ring plan` read it too."""

from __future__ import annotations

KEY = "train.recompute"


def recompute_kwargs(recompute, num_layers: int, use_te: bool) -> dict:
    """recompute: anything with granularity (none|selective|full), modules and num_layers
    (recipe.schema.RecomputeSection); None: no recompute. Returns the TransformerConfig keys."""
    if recompute is None or recompute.granularity == "none":
        return {"recompute_granularity": None}
    if recompute.granularity == "full":
        if recompute.num_layers < 1 or num_layers % recompute.num_layers:
            raise ValueError(f"{KEY}.num_layers: {recompute.num_layers} layers per recomputed block must divide the "
                             f"model's {num_layers} layers (full recompute, Megatron's uniform method)")
        return {"recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": recompute.num_layers}
    if recompute.granularity != "selective":
        raise ValueError(f"{KEY}.granularity: {recompute.granularity!r} is not none, selective or full")
    modules = list(recompute.modules)
    if not modules:
        raise ValueError(f"{KEY}.modules: selective recompute needs at least one module")
    if "mlp" in modules:
        # Megatron applies `mlp` to dense MLP layers only; every Ling layer is MoE.
        raise ValueError(f"{KEY}.modules: mlp recomputes dense MLP layers and every Ling layer is MoE "
                         "(moe: the whole MoE layer; shared_experts: its shared expert)")
    if "layernorm" in modules and not use_te:
        # megatron-core 0.16.1's CheckpointWithoutOutput reads transformer-engine's FP8 state.
        raise ValueError(f"{KEY}.modules: layernorm recompute needs transformer-engine (on GPU); without it "
                         "use core_attn, moe or shared_experts")
    if "moe_act" in modules and not use_te:
        raise ValueError(f"{KEY}.modules: moe_act needs Megatron's grouped-GEMM experts (transformer-engine, "
                         "on GPU); without it use moe or shared_experts")
    return {"recompute_granularity": "selective", "recompute_modules": modules}
