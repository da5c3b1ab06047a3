"""Held-out evaluation, shared by `select` (the selection rule's numbers per checkpoint) and the
RL stage's evaluation: the mean token entropy of the model's own sampled responses to held-out
RL prompts (temperature as in RL), and its held-out accuracy by the RL rewards.

The responses are sampled in this process (inference/sampling.py: the CPU demo), or by a server
engine (an SGLang fleet serving the same weights: at 32K tokens under TP the in-process sampler
takes hours); the engine's samples are then scored here and their entropy measured with one
teacher-forced pass (inference/teacher_forced.py)."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_ring.data.rl_prompts import PromptRow
from megatron_ring.inference.sampling import generate
from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.inference.teacher_forced import response_entropies
from megatron_ring.platform.distributed import device, rank0_then_broadcast
from megatron_ring.rewards.code_reward import CodeRewardSettings
from megatron_ring.rewards.reward_pool import REWARD_FNS, score_one


def _sample_here(model, tokenizer, prompts, keys, n, params, batch_size):
    """This rank's samples from the model itself: (tokens, sum of token entropies) per key."""
    samples = generate(model, [tokenizer.encode_prompt(prompts[k // n].messages()) for k in keys], keys, params,
                       tokenizer.eos_id, batch_size)
    return [(s.tokens, sum(s.entropies)) for s in samples]


def _sample_with(engine, model, tokenizer, prompts, n, params, batch_size):
    """Every sample from a server engine, called on rank 0 (keys: the global prompt index, so
    samples are reproducible) and broadcast; then this rank's share of them, with the entropy the
    model gives them at the sampling temperature (the same share as _sample_here's keys)."""
    encoded = [tokenizer.encode_prompt(r.messages()) for r in prompts]
    out = rank0_then_broadcast(lambda: [[c.tokens for c in group] for group in
                                        engine.generate(encoded, n, params, list(range(len(prompts))))])
    pairs = [(encoded[k // n], out[k // n][k % n]) for k in range(len(prompts) * n)]
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    entropies = response_entropies(model, pairs, params.temperature, batch_size)
    return [(tokens, h) for (_, tokens), (h, _) in zip(pairs[dp_rank::dp], entropies)]


def evaluate(model, tokenizer, prompts: list[PromptRow], samples_per_prompt: int, params: SamplingParams,
             batch_size: int, settings: CodeRewardSettings, engine=None) -> dict:
    """Collective over all ranks. Each (prompt, sample) pair is sampled in this process by one
    data-parallel rank, or (engine: a RolloutEngine that is not collective, serving the model's
    current weights) by the engine; each rank scores its share, and the sums are then added over
    the data-parallel group (TP ranks hold copies). batch_size: prompts sampled, or responses
    teacher-forced, together. Code answers run in the sandbox as `settings` say (the run
    directory hidden from them)."""
    n = samples_per_prompt
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    keys = list(range(len(prompts) * n))[dp_rank::dp]
    if engine is None or engine.collective:
        sampled = _sample_here(model, tokenizer, prompts, keys, n, params, batch_size)
    else:
        sampled = _sample_with(engine, model, tokenizer, prompts, n, params, batch_size)
    domains = sorted(REWARD_FNS)
    sums = defaultdict(float)
    for k, (tokens, entropy) in zip(keys, sampled):
        row = prompts[k // n]
        sums["entropy"] += entropy
        sums["tokens"] += len(tokens)
        sums["responses"] += 1
        sums[f"{row.domain}_n"] += 1  # the same verifiers as the RL rewards (code: the sandbox)
        sums[f"{row.domain}_correct"] += score_one(row.domain, tokenizer.decode(tokens), row.row, settings).reward
    names = ["entropy", "tokens", "responses"] + [f"{d}_{k}" for d in domains for k in ("n", "correct")]
    totals = torch.tensor([sums[name] for name in names], dtype=torch.float64, device=device())
    dist.all_reduce(totals, group=ps.get_data_parallel_group())
    t = dict(zip(names, totals.tolist()))
    scored = sum(t[f"{d}_n"] for d in domains)
    out = {
        # Token-weighted: every sampled token's predictive entropy counts once, as in RL.
        "entropy": t["entropy"] / max(t["tokens"], 1),
        "accuracy": sum(t[f"{d}_correct"] for d in domains) / max(scored, 1),
        "response_len_mean": t["tokens"] / max(t["responses"], 1),
    }
    for d in domains:
        if t[f"{d}_n"]:
            out[f"accuracy_{d}"] = t[f"{d}_correct"] / t[f"{d}_n"]
    return out
