"""Parameter counts read off the Megatron model itself (built on the meta device)."""

from __future__ import annotations


def count_params(model) -> dict:
    """Total, and active per token: routed experts count top-k / num_experts of their weights."""
    arch = model.arch
    total = routed = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".mlp.experts." in name:
            routed += p.numel()
    active = total - routed + routed * arch.moe_topk // arch.num_experts
    return {"total_params": total, "active_params": active, "routed_expert_params": routed}
