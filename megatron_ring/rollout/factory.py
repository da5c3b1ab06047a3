"""The recipe's rollout engine."""

from __future__ import annotations


def make_engine(recipe, model, tokenizer, run_dir):
    ro = recipe.rollout
    if ro.engine == "embedded":
        from megatron_ring.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine(model, tokenizer.eos_id, ro.batch_size)
    if ro.engine == "replay":
        from megatron_ring.recipe.schema import expand
        from megatron_ring.rollout.replay import ReplayEngine

        return ReplayEngine(expand(ro.replay_dir, run_dir))
    from megatron_ring.rollout.sglang_engine import SGLangEngine

    return SGLangEngine.from_recipe(recipe, model, tokenizer, run_dir)
