"""Multiple-choice reward: the letter in the last \\boxed{} equals the reference letter."""

from __future__ import annotations

import re

from megatron_ring.rewards.boxed import last_boxed

_TEXT = re.compile(r"\\text\{([^{}]*)\}")  # \text{D} -> D
_LETTER = re.compile(r"^\(?([A-Za-z])\)?(?:[.:)\s]|$)")


def answer_letter(response: str) -> str | None:
    answer = last_boxed(response)
    if not answer:
        return None
    m = _LETTER.match(_TEXT.sub(r"\1", answer).strip())
    return m.group(1).upper() if m else None


def score_choice(response: str, reference: str) -> float:
    return 1.0 if answer_letter(response) == reference.strip().upper() else 0.0
