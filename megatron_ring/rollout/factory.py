"""The recipe's rollout engine. The embedded and SGLang engines are imported only when chosen:
one imports Megatron's inference stack, the other the SGLang client, server and weight sync."""

from __future__ import annotations

from megatron_ring.recipe.schema import expand
from megatron_ring.rollout.replay import ReplayEngine


def make_engine(recipe, model, tokenizer, run_dir):
    ro = recipe.rollout
    if ro.engine == "embedded":
        from megatron_ring.rollout.embedded import EmbeddedEngine  # deferred: see the module docstring

        return EmbeddedEngine(model, tokenizer.eos_id, ro.batch_size, routing=recipe.routed_experts,
                              bf16=ro.sampler_dtype == "bf16")
    if ro.engine == "replay":
        return ReplayEngine(expand(ro.replay_dir, run_dir))
    from megatron_ring.rollout.sglang_engine import SGLangEngine  # deferred: see the module docstring

    return SGLangEngine.from_recipe(recipe, model, tokenizer, run_dir)
