"""The embedded rollout engine: the trainer's own Megatron model samples the responses (the
default of the tiny recipes and the CPU tests). Pushing weights is a no-op: it samples from the
weights being trained. Each data-parallel rank generates its share of the (prompt, sample) pairs;
the completions are then gathered so every rank holds all of them."""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_ring.inference.sampling import generate
from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.rollout.streamed_rewards import handed_over
from megatron_ring.rollout.base import Completion, RolloutEngine


class EmbeddedEngine(RolloutEngine):
    collective = True  # every rank samples its share with the trainer's model

    def __init__(self, model, eos_id: int, batch_size: int = 64, routing: bool = False, bf16: bool = False):
        """routing: report each sample's routed experts; bf16: sample under bf16 autocast."""
        self.model = model
        self.eos_id = eos_id
        self.batch_size = batch_size
        self.routing, self.bf16 = routing, bf16

    def generate(self, prompts, n, params: SamplingParams, keys=None, on_group=None):
        keys = list(range(len(prompts))) if keys is None else keys
        pairs = [(p, s) for p in range(len(prompts)) for s in range(n)]
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mine = pairs[rank::dp]
        # A sample's seed key: its prompt's key and its index, so it is the same at any layout.
        samples = generate(self.model, [prompts[p] for p, _ in mine], [keys[p] * n + s for p, s in mine], params,
                           self.eos_id, self.batch_size, routing=self.routing, bf16=self.bf16)
        local = [(p, s, Completion(x.tokens, x.logprobs, x.finish_reason, routing=x.routing))
                 for (p, s), x in zip(mine, samples)]
        gathered = [None] * dp
        dist.all_gather_object(gathered, local, group=ps.get_data_parallel_group())
        out = [[None] * n for _ in prompts]
        for part in gathered:
            for p, s, c in part:
                out[p][s] = c
        return handed_over(out, on_group) if on_group else out

    def push_weights(self, model, version: int) -> None:
        pass  # samples from the live weights

    def health(self) -> bool:
        return True
