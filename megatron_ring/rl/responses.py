"""One sampled response as it travels through an RL step, and the part of it that carries loss.

A Segment is a response with a token range [start, end) of its response tokens that carries
loss this step. C3PO cuts the response that crosses the budget, so a segment can be a prefix
(this step) or the remainder (carried to the next step); the whole response stays the context."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Response:
    uid: int  # unique over the run: (rollout round, prompt, sample) packed into one id
    group: int  # prompt group id: the K samples of one prompt share it
    domain: str
    prompt_ids: list[int]
    tokens: list[int]
    rollout_logp: list[float]  # the rollout engine's logprob of each response token
    finish_reason: str = "length"
    reward: float = 0.0
    advantage: float = 0.0
    version: int = 0  # the optimizer step whose weights sampled it
    # The engine's routed experts, uint8 [prompt + tokens - 1, layers, top_k] (rollout/base.py's
    # Completion.routing); None unless the recipe asks for them.
    routing: np.ndarray | None = None

    def to_json(self) -> dict:
        """Checkpoints before carried_segments.npz kept segments as JSON; they had no routing."""
        d = dict(vars(self))
        d.pop("routing")
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Response":
        return cls(**d)


@dataclass
class Segment:
    response: Response
    start: int = 0  # first response token with loss
    end: int = -1  # one past the last; -1: the end of the response

    def __post_init__(self):
        if self.end < 0:
            self.end = len(self.response.tokens)
        assert 0 <= self.start < self.end <= len(self.response.tokens), (self.start, self.end)

    @property
    def n_tokens(self) -> int:
        return self.end - self.start

    @property
    def seq_len(self) -> int:
        """Tokens the forward needs: prompt + response up to the last one with loss."""
        return len(self.response.prompt_ids) + self.end

    def to_json(self) -> dict:
        return {"response": self.response.to_json(), "start": self.start, "end": self.end}

    @classmethod
    def from_json(cls, d: dict) -> "Segment":
        return cls(Response.from_json(d["response"]), d["start"], d["end"])


def split_at(seg: Segment, n: int) -> tuple[Segment, Segment | None]:
    """The first n loss tokens of a segment, and the rest (None if nothing is left)."""
    if n >= seg.n_tokens:
        return seg, None
    return Segment(seg.response, seg.start, seg.start + n), Segment(seg.response, seg.start + n, seg.end)
