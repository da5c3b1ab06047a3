"""The selection rule. More SFT epochs lower the entropy of a model's own samples, and a model
that starts RL with too little entropy collapses early (Ring-lite Fig. 5-6), so the RL start is
the checkpoint whose entropy lies in [low, high] (0.3-0.5 by default), not the best-scoring one.

Tie rule: when several checkpoints are in range, the one with the highest held-out accuracy
wins; equal accuracy goes to the later step (more distilled, still exploring enough)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Candidate:
    path: str
    epoch: float
    step: int
    entropy: float
    accuracy: float


class NoCheckpointInRange(ValueError):
    def __init__(self, nearest: Candidate, low: float, high: float):
        side = "below" if nearest.entropy < low else "above"
        super().__init__(
            f"no checkpoint has entropy in [{low}, {high}]; the nearest is {nearest.path} "
            f"(step {nearest.step}, epoch {nearest.epoch:g}) with entropy {nearest.entropy:.3f}, {side} the range. "
            f"Widen the range (--low/--high) or train {'fewer' if side == 'below' else 'more'} epochs.")
        self.nearest = nearest


def distance(c: Candidate, low: float, high: float) -> float:
    return max(low - c.entropy, c.entropy - high, 0.0)


def choose(candidates: list[Candidate], low: float = 0.3, high: float = 0.5) -> Candidate:
    if not candidates:
        raise ValueError("no checkpoints to choose from")
    inside = [c for c in candidates if low <= c.entropy <= high]
    if not inside:
        raise NoCheckpointInRange(min(candidates, key=lambda c: (distance(c, low, high), -c.step)), low, high)
    return max(inside, key=lambda c: (c.accuracy, c.step))
