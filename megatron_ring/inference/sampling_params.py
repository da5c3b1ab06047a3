"""How every engine samples (rollout engines, held-out evaluation)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingParams:
    """How every engine (and held-out evaluation) samples."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0  # with a per-sample key, makes every sample reproducible

    @classmethod
    def of(cls, section) -> "SamplingParams":
        """From a recipe section that has these four keys (rollout, select, eval)."""
        return cls(section.max_new_tokens, section.temperature, section.top_p, section.seed)
