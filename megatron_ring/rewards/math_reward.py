"""Math reward: the last \\boxed{} answer judged against the reference by Math-Verify
(symbolic equality, so 1/2, 0.5 and \\frac{1}{2} all match)."""

from __future__ import annotations

from math_verify import parse, verify

from megatron_ring.rewards.boxed import last_boxed


def score_math(response: str, reference: str) -> float:
    answer = last_boxed(response)
    if not answer:
        return 0.0
    gold = parse(f"\\boxed{{{reference}}}")
    pred = parse(f"\\boxed{{{answer}}}")
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred) else 0.0
