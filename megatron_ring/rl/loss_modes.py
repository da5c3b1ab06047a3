"""The three loss modes in one table. Each is -(1/D) * sum_t w_t * objective_t over the step's
loss tokens (objective: the clipped surrogate - beta*KL + c*entropy of ops/c3po_objective); a mode
says what its per-token weight w is, what its constant divisor D is, whether a step gathers
rollouts until a token budget is met, and how many budget buckets a step fills.

`StepBudget.of(recipe.rl, dp)` reads the mode and the budget scope from the recipe once; the
rollout side and the actor are handed it, nothing else looks at the recipe's loss_mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatron_ring.rl.responses import Segment
from megatron_ring.rl.token_budget import tokens_of


@dataclass(frozen=True)
class LossMode:
    name: str
    per_response_weight: bool  # w = 1/|y| on each token of a response of |y| tokens; else w = 1
    fills_budget: bool  # rollout rounds until the budget is met, the crossing response cut and carried
    divisor: Callable[["StepBudget", list[Segment]], int]  # D from the budget and the selected segments
    why: str  # the sentence that explains D


def _responses(segments: list[Segment]) -> int:
    return len({s.response.uid for s in segments})


MODES = {m.name: m for m in (
    LossMode("c3po", per_response_weight=False, fills_budget=True, divisor=lambda budget, segs: budget.total,
             why="C3PO (paper 3.2): D is the fixed token budget Phi (x DP with a per-rank budget), the same every "
                 "step even when fewer tokens were available, so a token's gradient weight never depends on how "
                 "long the step's other responses were."),
    LossMode("grpo", per_response_weight=True, fills_budget=False, divisor=lambda budget, segs: _responses(segs),
             why="GRPO as published: each response's tokens are averaged (w = 1/|y|), then D = the number of "
                 "responses in the step averages the responses, so a long response's tokens weigh less."),
    LossMode("token_mean", per_response_weight=False, fills_budget=False,
             divisor=lambda budget, segs: tokens_of(segs),
             why="DAPO's token-level mean: D = the loss tokens in the step, so every token of a step weighs the "
                 "same, but that weight changes from step to step with the responses' lengths."),
)}


@dataclass(frozen=True)
class StepBudget:
    """What one step trains on: the mode, and (modes that fill a budget) `buckets` buckets of
    `tokens` loss tokens each. per_rank: one bucket per data-parallel rank, which trains on its
    own bucket (Phi x DP per step); otherwise one global bucket spread over the ranks."""

    mode: LossMode
    tokens: int
    buckets: int
    per_rank: bool

    @classmethod
    def of(cls, rl, dp: int) -> "StepBudget":
        mode = MODES[rl.loss_mode]
        per_rank = mode.fills_budget and rl.budget_scope == "per_rank"
        return cls(mode, rl.token_budget, dp if per_rank else 1, per_rank)

    @property
    def total(self) -> int:
        return self.tokens * self.buckets

    def divisor(self, selected: list[Segment]) -> int:
        return self.mode.divisor(self, selected)
