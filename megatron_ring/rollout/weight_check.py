"""Is every engine serving what the trainer just pushed? Checked after every push (collective).

By name (exact): rollout.verify_tensors tensors, a different draw each push (always the embedding
and the last tensor), read back from each engine through SGLang's /get_weights_by_name (its first
rows, as float32) and compared bit for bit with the trainer's copy as sent (the push dtype's values).

By probe, where the engine cannot answer by name (SGLang's BailingMoe, i.e. Ling, has no
get_weights_by_name and answers 400): each engine greedily continues fixed prompts and reports
its logprobs; the trainer's own teacher-forced logprobs of the same tokens must agree within
PROBE_TOLERANCE (bf16 serving against the trainer's precision). A probe catches a mis-laid or
missing tensor (logprobs far apart), not a push of the previous step's weights (a step moves
logprobs by less than the tolerance): that is what the weight version each sample carries shows.
"""

from __future__ import annotations

import torch

from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.platform.distributed import rank0_then_broadcast
from megatron_ring.rollout.base import RolloutError
from megatron_ring.rollout.sglang_client import SGLangClient
from megatron_ring.rollout.weight_buckets import KEEP_ROWS

PROBE_TOLERANCE = 0.1  # nats, max |engine - trainer| over the probe's tokens
PROBE_NEW_TOKENS = 8


def probe_prompts(vocab: int) -> list[list[int]]:
    return [[(31 * i + 7 * k + 3) % vocab for i in range(12)] for k in range(2)]


def by_name(urls: list[str], kept: dict[str, torch.Tensor]) -> str | None:
    """Rank 0: the first mismatch ('' when none), or None when an engine cannot answer by name."""
    for url in urls:
        client = SGLangClient(url, timeout_s=120.0)
        for name, want in kept.items():
            try:
                got = client.get_weights_by_name(name, KEEP_ROWS)
            except RolloutError as e:
                if "refused" in str(e):  # a 4xx: this model class has no get_weights_by_name
                    return None
                raise
            try:
                got = torch.tensor(got, dtype=torch.float32).view(want.shape)
            except (TypeError, ValueError, RuntimeError):
                return f"{url}: /get_weights_by_name {name} answered {str(got)[:200]} (expected shape {list(want.shape)})"
            if not torch.equal(got, want):
                diff = (got - want).abs().max().item()
                return f"{url} serves {name} differing from the trainer's by up to {diff:.3g} after the push"
    return ""


def verify(model, urls: list[str], kept: dict[str, torch.Tensor], version: int) -> str:
    """Collective (kept: rank 0's; every rank calls it after the same push). Returns how the push
    was verified ("by_name", "probe"); RolloutError on a mismatch."""

    def read_back():
        problem = by_name(urls, kept)
        if problem:
            raise RolloutError(f"weight push {version} not verified: {problem}")
        if problem == "":
            return None
        prompts = probe_prompts(model.arch.vocab_size)
        params = SamplingParams(max_new_tokens=PROBE_NEW_TOKENS, temperature=0.0, top_p=1.0)
        return {url: [(p, c.tokens, c.logprobs) for p, [c] in zip(prompts, SGLangClient(url).generate(prompts, 1, params))]
                for url in urls}

    probes = rank0_then_broadcast(read_back, RolloutError)
    if probes is None:
        return "by_name"
    from megatron_ring.inference.teacher_forced import response_logprobs  # Megatron: only for a probe

    pairs = [(p, toks) for rows in probes.values() for p, toks, _ in rows]
    mine = response_logprobs(model, pairs)

    def compare():
        at = 0
        for url, rows in probes.items():
            for _, toks, theirs in rows:
                gap = max((abs(a - b) for a, b in zip(theirs, mine[at])), default=0.0)
                at += 1
                if gap > PROBE_TOLERANCE:
                    raise RolloutError(f"weight push {version} not verified: {url}'s greedy logprobs differ from the "
                                       f"trainer's by {gap:.3g} nats (> {PROBE_TOLERANCE}) on a probe prompt")
        return "probe"

    return rank0_then_broadcast(compare, RolloutError)
