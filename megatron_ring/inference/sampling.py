"""Sampling from the Megatron model itself, without a server: used to measure a checkpoint's
entropy on its own responses, and the core of the embedded rollout engine.

Without tensor parallelism the forward keeps Megatron's static KV cache (StaticInferenceContext):
a batch is prefilled up to its shortest prompt, then advanced one position per forward, rows
still inside their prompt being fed their next prompt token, so every row sits at the same
position and RoPE needs no per-row offsets. Under TP (sequence parallelism cannot split a
one-token step) every step re-runs the forward over the prompt and the tokens so far; rows are
right-padded, so causal attention keeps padding out of every real position. Both give the same
logits (to fp32 rounding).
Each (prompt, sample) has its own seeded generator, drawn once per generated token, so samples
do not depend on batch composition or on how prompts are split over ranks. All ranks run the
same number of forward passes (MoE all-to-all and TP collectives need every rank): a rank with
nothing left runs dummy steps.

With `routing`, each sample also keeps the experts every MoE layer chose for each position the
forward read (prompt and response tokens but the last: models/router_replay.py), the rollout
side of routing replay. With `bf16`, the forwards run under bf16 autocast (matmuls in bf16, as
an inference engine's kernels would be) while the model itself stays in the trainer's dtype:
the train-inference mismatch of a GPU run, on a CPU."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from megatron.core import parallel_state as ps

from megatron_ring.models.router_replay import DTYPE, routing_of
from megatron_ring.ops.vocab_parallel import full_logits
from megatron_ring.platform.distributed import any_rank, device
from megatron_ring.inference.sampling_params import SamplingParams


@dataclass
class Sample:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # of each sampled token, after temperature
    entropies: list[float] = field(default_factory=list)  # of the full distribution, after temperature
    finish_reason: str = "length"  # "stop" when it produced the end-of-sequence token
    routing: np.ndarray | None = None  # uint8 [prompt + tokens - 1, layers, k] when asked for


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
    u = torch.stack([torch.rand(p.shape[-1], generator=g) for g in gens]).to(p.device)  # CPU generators: seeded per row
    token = (keep / -torch.log1p(-u)).argmax(-1)
    # Python lists: one device-to-host copy per step, not one per token.
    return token.tolist(), logp.gather(-1, token[:, None]).squeeze(-1).tolist(), entropy.tolist()


class _Batch:
    """One batch of prompts being sampled; `record` appends a sampled token."""

    def __init__(self, prompts, keys, idx, params: SamplingParams, eos_id: int, limit: int, out, routing: bool):
        self.seqs = {i: list(prompts[i]) for i in idx}
        self.routes = {i: [] for i in idx} if routing else None  # per row: [positions, layers, k] chunks
        self.gens = {i: torch.Generator().manual_seed(params.seed * 1_000_003 + keys[i]) for i in idx}
        self.left = {i: params.max_new_tokens for i in idx}
        self.active = [i for i in idx if len(self.seqs[i]) < limit and params.max_new_tokens > 0]
        self.eos_id, self.limit, self.out = eos_id, limit, out

    def record(self, i: int, tok: int, logp: float, ent: float) -> bool:
        """Append a sampled token; False when row i is finished."""
        sample = self.out[i]
        sample.tokens.append(tok)
        sample.logprobs.append(logp)
        sample.entropies.append(ent)
        self.seqs[i].append(tok)
        self.left[i] -= 1
        if tok == self.eos_id:
            sample.finish_reason = "stop"
            return False
        return len(self.seqs[i]) < self.limit and self.left[i] > 0

    def route(self, i: int, chosen: np.ndarray) -> None:
        """The experts chosen at row i's next positions (a chunk [positions, layers, k])."""
        if self.routes is not None:
            self.routes[i].append(chosen)

    def finish(self) -> None:
        """Each sample's routing: the positions its forwards read, the last sampled token's
        (never read) excluded; rows fed padding after their end are cut there."""
        if self.routes is None:
            return
        for i, chunks in self.routes.items():
            n = len(self.seqs[i]) - 1
            if self.out[i].tokens and chunks:
                r = np.concatenate(chunks)[:n].astype(DTYPE)
                assert len(r) == n, (len(r), n)
                self.out[i].routing = r


def _forward(model, bf16: bool, *args, **kwargs):
    """The model's forward, under bf16 autocast when the sampler plays a bf16 engine."""
    autocast = torch.autocast(device().type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        return model(*args, **kwargs)


def _recompute_batch(model, b: _Batch, params: SamplingParams, tp: int, bf16: bool) -> None:
    """Every step: a forward over each active row's prompt and tokens so far (a row's routing:
    that of the forward that sampled its last token)."""
    while any_rank(bool(b.active)):
        rows = [b.seqs[i] for i in b.active] or [[b.eos_id]]
        width = -(-max(map(len, rows)) // tp) * tp  # sequence parallelism splits the sequence
        ids = torch.full((len(rows), width), b.eos_id, dtype=torch.long)
        for r, s in enumerate(rows):
            ids[r, :len(s)] = torch.tensor(s)
        pos = torch.arange(width).expand(len(rows), width)
        logits = full_logits(_forward(model, bf16, ids.to(device()), pos.to(device()), None), model.arch.vocab_size,
                             ps.get_tensor_model_parallel_group())
        chosen = routing_of(model).chosen(len(rows), gather=True).cpu().numpy() if b.routes is not None else None
        if not b.active:
            continue
        for r, i in enumerate(b.active if chosen is not None else ()):
            b.routes[i] = [chosen[r, :len(rows[r])]]
        last = torch.tensor([len(s) - 1 for s in rows], device=logits.device)
        rows_idx = torch.arange(len(rows), device=logits.device)
        token, logp, ent = _pick(logits[rows_idx, last], params, [b.gens[i] for i in b.active])
        b.active = [i for r, i in enumerate(b.active) if b.record(i, int(token[r]), float(logp[r]), float(ent[r]))]


def _cached_batch(model, b: _Batch, params: SamplingParams, bf16: bool) -> None:
    """Prefill to the shortest prompt, then one position per forward with the KV cache. A rank
    whose rows are done runs one-token forwards without a cache while others still sample."""
    from megatron.core.inference.contexts import StaticInferenceContext

    rows = list(b.active)
    prompt_len = {i: len(b.seqs[i]) for i in rows}
    end = max((min(prompt_len[i] + b.left[i], b.limit) for i in rows), default=0)
    ctx = StaticInferenceContext(max(len(rows), 1), max(end, 1))
    width = min(prompt_len.values(), default=0)
    ids = torch.tensor([b.seqs[i][:width] for i in rows], dtype=torch.long)
    vocab = model.arch.vocab_size
    while True:
        if rows and ctx.sequence_len_offset < end:
            t0 = ctx.sequence_len_offset
            pos = torch.arange(t0, t0 + ids.shape[1]).expand(ids.shape[0], -1)
            logits = _forward(model, bf16, ids.to(device()), pos.to(device()), None, inference_context=ctx,
                              runtime_gather_output=True)[:, -1, :vocab]
            if b.routes is not None:
                chosen = routing_of(model).chosen(len(rows)).cpu().numpy()  # one copy per step
                for r, i in enumerate(rows):
                    b.route(i, chosen[r])
            ctx.sequence_len_offset += ids.shape[1]
            ctx.enable_decode_mode()
            t = ctx.sequence_len_offset  # the position whose token these logits predict
            due = [r for r, i in enumerate(rows) if i in b.active and t >= prompt_len[i]]
            if due:
                token, logp, ent = _pick(logits[due], params, [b.gens[rows[r]] for r in due])
                for k, r in enumerate(due):
                    if not b.record(rows[r], int(token[k]), float(logp[k]), float(ent[k])):
                        b.active.remove(rows[r])
            ids = torch.tensor([[b.seqs[i][t] if t < len(b.seqs[i]) else b.eos_id] for i in rows], dtype=torch.long)
        else:  # nothing left here: keep the other ranks' collectives company
            _forward(model, bf16, torch.full((1, 1), b.eos_id, dtype=torch.long, device=device()),
                     torch.zeros((1, 1), dtype=torch.long, device=device()), None)
        if not any_rank(bool(b.active) and ctx.sequence_len_offset < end):
            return


@torch.no_grad()
def generate(model, prompts: list[list[int]], keys: list[int], params: SamplingParams, eos_id: int,
             batch_size: int = 64, routing: bool = False, bf16: bool = False) -> list[Sample]:
    """Sample one response per prompt on this rank (keys: a global id per prompt for its seed).
    Collective over all ranks; ranks in one TP group must pass the same prompts. The model's
    training mode is restored afterwards. routing: keep each sample's routed experts; bf16:
    sample under bf16 autocast."""
    was_training = model.training
    model.eval()
    out = [Sample() for _ in prompts]
    tp = ps.get_tensor_model_parallel_world_size()
    start = 0
    while any_rank(start < len(prompts)):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        start += batch_size
        b = _Batch(prompts, keys, idx, params, eos_id, model.arch.max_position_embeddings, out, routing)
        if tp == 1:
            _cached_batch(model, b, params, bf16)
        else:
            _recompute_batch(model, b, params, tp, bf16)
        b.finish()
    model.train(was_training)
    return out
