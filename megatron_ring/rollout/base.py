"""The one interface every rollout engine implements, so the RL loop does not know which it has.

generate: prompt token ids, n samples each, sampling parameters -> per prompt, n completions with
their token ids, the sampler's logprob of each token and why generation stopped.
push_weights: make the engine sample from the trainer's current weights.
health: is the engine able to serve."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_ring.inference.sampling_params import SamplingParams


class RolloutError(RuntimeError):
    """The engine cannot serve (dead server, malformed answer): the step ends, the last
    checkpoint stays intact."""


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # the sampler's logprob of each token
    finish_reason: str = "length"  # "stop" (end-of-sequence token), "length", or "abort"
    weight_version: str | None = None  # the engine's weight version that sampled it (SGLang's meta_info)
    # The experts each MoE layer chose at every position the engine's forwards read (prompt and
    # response tokens but the last), uint8 [prompt + tokens - 1, layers, top_k], UNKNOWN (255)
    # where the engine did not report (models/router_replay.py); None unless asked for.
    routing: np.ndarray | None = None


class RolloutEngine:
    """Base class. `generate` of a collective engine (the embedded one: the trainer's own model
    samples) is called on every rank; of the others (servers, replay) on rank 0 only, while the
    other ranks wait on the control group. push_weights is collective."""

    collective = False

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams,
                 keys: list[int] | None = None, on_group=None) -> list[list[Completion]]:
        """n completions for each prompt (keys: a global id per prompt, for seeding).
        on_group(i, completions), when given, is called once per prompt as its group is complete
        (possibly from another thread), so rewards can start before the last group is back."""
        raise NotImplementedError

    def push_weights(self, model, version: int) -> dict | None:
        """Serve the model's current weights from now on (version: the optimizer step); may
        return figures of the push for the step record."""
        raise NotImplementedError

    def release_memory(self) -> None:
        """Collective: free the engine's GPU memory while the trainer trains (a colocated fleet
        with the memory saver); the next push_weights takes it back."""

    def health(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass
