"""The one interface every rollout engine implements, so the RL loop does not know which it has.

generate: prompt token ids, n samples each, sampling parameters -> per prompt, n completions with
their token ids, the sampler's logprob of each token and why generation stopped.
push_weights: make the engine sample from the trainer's current weights.
health: is the engine able to serve."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_ring.inference.sampling_params import SamplingParams


class RolloutError(RuntimeError):
    """The engine cannot serve (dead server, malformed answer): the step ends, the last
    checkpoint stays intact."""


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # the sampler's logprob of each token
    finish_reason: str = "length"  # "stop" (end-of-sequence token), "length", or "abort"


class RolloutEngine:
    """Base class; collective methods are called on every rank of the trainer."""

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams,
                 keys: list[int] | None = None) -> list[list[Completion]]:
        """n completions for each prompt (keys: a global id per prompt, for seeding)."""
        raise NotImplementedError

    def push_weights(self, model, version: int) -> None:
        """Serve the model's current weights from now on (version: the optimizer step)."""
        raise NotImplementedError

    def health(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass
