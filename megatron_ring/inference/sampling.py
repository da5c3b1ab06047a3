"""Sampling from the Megatron model itself, without a server: used to measure a checkpoint's
entropy on its own responses, and the core of the embedded rollout engine.

Every step re-runs the forward over the prompt and the tokens so far (no KV cache): simple and
exact, and cheap at the sizes it is used for on CPU. Rows are right-padded, so causal attention
keeps padding out of every real position. Each (prompt, sample) has its own seeded generator,
so samples do not depend on batch composition or on how prompts are split over ranks. All
ranks run the same number of forward passes (MoE all-to-all and TP collectives need every rank):
a rank with nothing left runs a one-token dummy step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_ring.models.lm_loss import full_logits


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Sample:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each sampled token, after temperature
    entropies: list[float] = field(default_factory=list)  # of the full distribution, after temperature
    finish_reason: str = "length"  # "stop" when it produced the end-of-sequence token


def _pick(logits: torch.Tensor, params: SamplingParams, gens: list[torch.Generator]):
    """logits [B, V] -> (token, its logprob, entropy) per row."""
    logp = torch.log_softmax(logits.float() / params.temperature, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    keep = p
    if params.top_p < 1.0:  # nucleus: smallest set of tokens whose mass reaches top_p
        sp, order = p.sort(dim=-1, descending=True)
        drop = sp.cumsum(-1) - sp >= params.top_p
        keep = torch.zeros_like(p).scatter(-1, order, sp.masked_fill(drop, 0.0))
    # Exponential race (Gumbel-max): argmax p/E with E ~ Exp(1) samples from p.
    u = torch.stack([torch.rand(p.shape[-1], generator=g) for g in gens])
    token = (keep / -torch.log1p(-u)).argmax(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1), entropy


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@torch.no_grad()
def generate(model, prompts: list[list[int]], keys: list[int], params: SamplingParams, eos_id: int,
             batch_size: int = 64) -> list[Sample]:
    """Sample one response per prompt on this rank (keys: a global id per prompt for its seed).
    Collective over all ranks; ranks in one TP group must pass the same prompts."""
    model.eval()
    out = [Sample() for _ in prompts]
    tp = ps.get_tensor_model_parallel_world_size()
    limit = model.arch.max_position_embeddings
    start = 0
    while _any_rank(start < len(prompts)):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        start += batch_size
        seqs = {i: list(prompts[i]) for i in idx}
        gens = {i: torch.Generator().manual_seed(params.seed * 1_000_003 + keys[i]) for i in idx}
        active = [i for i in idx if len(seqs[i]) < limit]
        for _ in range(params.max_new_tokens):
            if not _any_rank(bool(active)):
                break
            rows = [seqs[i] for i in active] or [[eos_id]]
            width = -(-max(map(len, rows)) // tp) * tp  # sequence parallelism splits the sequence
            ids = torch.full((len(rows), width), eos_id, dtype=torch.long)
            for r, s in enumerate(rows):
                ids[r, :len(s)] = torch.tensor(s)
            pos = torch.arange(width).expand(len(rows), width)
            logits = full_logits(model(ids, pos, None), model.arch.vocab_size)
            if not active:
                continue
            last = torch.tensor([len(s) - 1 for s in rows])
            token, logp, ent = _pick(logits[torch.arange(len(rows)), last], params, [gens[i] for i in active])
            still = []
            for r, i in enumerate(active):
                tok = int(token[r])
                sample = out[i]
                sample.tokens.append(tok)
                sample.logprobs.append(float(logp[r]))
                sample.entropies.append(float(ent[r]))
                seqs[i].append(tok)
                if tok == eos_id:
                    sample.finish_reason = "stop"
                elif len(seqs[i]) < limit:
                    still.append(i)
            active = still
    return out
