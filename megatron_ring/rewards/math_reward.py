"""Math reward: the last \\boxed{} answer judged against the reference by Math-Verify
(symbolic equality, so 1/2, 0.5 and \\frac{1}{2} all match).

Math-Verify logs the whole expression it gave up on ("Timeout during parsing: <pred>"): from a
policy's response that is tens of kilobytes on one line of the trainer's log, so its records are
cut to LOG_CHARS here."""

from __future__ import annotations

import logging

from math_verify import parse, verify

from megatron_ring.rewards.boxed import last_boxed

LOG_CHARS = 200
TIMEOUT_S = 5  # Math-Verify's own (signal.alarm, whole seconds) for parsing and for comparing


class _ShortRecords(logging.Filter):
    """Keeps the head of a record's message and says how long it was."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if len(text) > LOG_CHARS:
            record.msg, record.args = f"{text[:LOG_CHARS]}... ({len(text)} characters)", None
        return True


for _name in ("math_verify.parser", "math_verify.grader", "math_verify.metric", "math_verify.utils"):
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _ShortRecords) for f in _logger.filters):
        _logger.addFilter(_ShortRecords())


def score_math(response: str, reference: str, timeout_s: int = TIMEOUT_S) -> float:
    answer = last_boxed(response)
    if not answer:
        return 0.0
    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout_s)
    pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout_s)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=timeout_s) else 0.0
