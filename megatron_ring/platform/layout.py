"""The parallel layout of a run, validated against the model before any process group starts."""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A parallel layout that cannot run this model."""


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    world_size: int = 1

    @property
    def dp(self) -> int:
        return self.world_size // self.tp

    @property
    def sequence_parallel(self) -> bool:
        # Megatron requires sequence parallelism for MoE under TP > 1 in training.
        return self.tp > 1

    def validate(self, arch) -> "Layout":
        """arch: the model's shape, anything with num_experts, num_attention_heads and
        num_query_groups (a models.presets.LingArch; platform does not import models)."""
        problems = []
        if self.tp < 1 or self.ep < 1:
            problems.append(f"tp={self.tp} and ep={self.ep} must be >= 1")
        if self.world_size % self.tp:
            problems.append(f"world size {self.world_size} is not divisible by tp={self.tp}")
        # Experts are not tensor-parallel (expert_tensor_parallel_size=1): EP ranks span TP x DP.
        if self.world_size % self.ep:
            problems.append(f"world size {self.world_size} is not divisible by ep={self.ep}")
        if arch.num_experts % self.ep:
            problems.append(f"num_experts={arch.num_experts} is not divisible by ep={self.ep}")
        if arch.num_attention_heads % self.tp:
            problems.append(
                f"num_attention_heads={arch.num_attention_heads} is not divisible by tp={self.tp}"
            )
        if arch.num_query_groups % self.tp:
            problems.append(
                f"num_query_groups={arch.num_query_groups} is not divisible by tp={self.tp}"
            )
        if problems:
            raise LayoutError(f"impossible parallel layout tp={self.tp} ep={self.ep} "
                              f"world_size={self.world_size}: " + "; ".join(problems))
        return self
