"""Held-out accuracy during RL: the policy samples the held-out prompts (the same measurement
`select` makes of distillation checkpoints, inference/held_out.py) before the first step, every
eval.every_steps and after the last, so a stage's effect is read off its own metrics. With
rollout.engine sglang the samples come from the fleet, which the loop has just given the
policy's current weights; otherwise the trainer's model samples them itself."""

from __future__ import annotations

from megatron_ring.data.rl_prompts import read_prompts
from megatron_ring.inference.held_out import evaluate
from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.recipe.schema import expand
from megatron_ring.rl.rollouts import code_settings


class Evaluator:
    def __init__(self, recipe, run_dir, tokenizer):
        e = self.settings = recipe.eval
        self.tokenizer = tokenizer
        self.through_engine = recipe.rollout.engine == "sglang"  # replay serves old responses, not the policy's
        self.code = code_settings(recipe, run_dir)  # scored in this process, as the rollouts' pool scores
        self.prompts = []
        if e.prompts:
            self.prompts = read_prompts([expand(e.prompts, run_dir)], recipe.data.domains, "fail")
            if e.max_prompts:
                self.prompts = self.prompts[:e.max_prompts]

    def due(self, step: int, last: int) -> bool:
        every = self.settings.every_steps
        return bool(self.prompts) and (step == last or (every > 0 and step % every == 0))

    def run(self, model, engine=None) -> dict:
        """Collective. engine: the stage's rollout engine, used when it is the SGLang fleet."""
        if not self.prompts:
            return {}
        e = self.settings
        result = evaluate(model, self.tokenizer, self.prompts, e.samples_per_prompt, SamplingParams.of(e),
                          e.batch_size, self.code, engine=engine if self.through_engine else None)
        return {f"eval_{k}": v for k, v in result.items()}
