"""Held-out accuracy during RL: the policy samples the held-out prompts (the same measurement
`select` makes of distillation checkpoints) before the first step, every eval.every_steps and
after the last, so a stage's effect is read off its own metrics."""

from __future__ import annotations

from megatron_ring.recipe.schema import expand
from megatron_ring.rewards.code_reward import configure_sandbox
from megatron_ring.rl.prompt_stream import read_prompts
from megatron_ring.rollout.base import SamplingParams
from megatron_ring.selection.evaluate import evaluate


class Evaluator:
    def __init__(self, recipe, run_dir, tokenizer):
        e = self.settings = recipe.eval
        self.tokenizer, self.run_dir = tokenizer, run_dir
        configure_sandbox(float_tolerance=recipe.reward.float_tolerance)  # scored in this process, as RL's pool does
        self.prompts = []
        if e.prompts:
            self.prompts = read_prompts([expand(e.prompts, run_dir)], recipe.data.domains, "fail")
            if e.max_prompts:
                self.prompts = self.prompts[:e.max_prompts]

    def due(self, step: int, last: int) -> bool:
        every = self.settings.every_steps
        return bool(self.prompts) and (step == last or (every > 0 and step % every == 0))

    def run(self, model) -> dict:
        if not self.prompts:
            return {}
        e = self.settings
        result = evaluate(model, self.tokenizer, self.prompts, e.samples_per_prompt, SamplingParams.of(e),
                          e.batch_size, self.run_dir)
        return {f"eval_{k}": v for k, v in result.items()}
