"""GRPO advantages (paper Eq. 1): each response's reward normalised within its prompt group,
A_i = (R_i - mean(R)) / (std(R) + eps), the same A_i on every token of response i. Computed on
full groups, before C3PO cuts anything."""

from __future__ import annotations

import math
from collections import defaultdict

from megatron_ring.rl.responses import Response


def group_advantages(responses: list[Response], eps: float = 1e-6) -> dict[int, float]:
    """Sets .advantage on every response; returns each group's reward std. std is the population
    std over the group (K responses are the whole group, not a sample of it)."""
    groups: dict[int, list[Response]] = defaultdict(list)
    for r in responses:
        groups[r.group].append(r)
    stds = {}
    for g, members in groups.items():
        rewards = [r.reward for r in members]
        mean = sum(rewards) / len(rewards)
        std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / len(rewards))
        for r in members:
            r.advantage = (r.reward - mean) / (std + eps)
        stds[g] = std
    return stds


def drop_zero_variance(responses: list[Response], stds: dict[int, float]) -> list[Response]:
    """Groups whose responses all got the same reward have zero advantage everywhere: they add
    tokens to the budget but no policy gradient (only KL and entropy terms)."""
    return [r for r in responses if stds[r.group] > 0]
