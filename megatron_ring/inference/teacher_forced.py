"""The entropy of responses sampled elsewhere (an SGLang fleet), measured by the model itself with
teacher forcing: `select` and the RL evaluation read the mean token entropy of the model's own
samples, and a server reports only the sampled tokens' logprobs. One forward-only pass per
micro-batch to the final hidden states, then ops.logprob_entropy (the op of the SFT loss, the RL
loss and the old/reference passes) at the sampling temperature: per response token, the entropy
of softmax(logits / temperature), the quantity sampling.generate reports for its own samples, with
no [tokens, vocabulary] logits tensor."""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

from megatron_ring.models.lm_head import flat, head_args, hidden_tokens, unwrap
from megatron_ring.ops import logprob_entropy
from megatron_ring.platform.distributed import any_rank, device

Pair = tuple[list[int], list[int]]  # (prompt token ids, response token ids)


def _rows(pairs: list[Pair], multiple: int):
    """(input ids, next-token targets, mask of the positions predicting response tokens), each
    [b, s], right-padded with id 0 (causal attention keeps padding out of every real position) to
    a multiple of the TP size (sequence parallelism splits the sequence). A rank with no pairs
    gets a one-row dummy so that it still joins the collective forward."""
    seqs = [list(p) + list(r) for p, r in pairs] or [[0, 0]]
    width = -(-max(max(len(s) - 1, 1) for s in seqs) // multiple) * multiple
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    targets, mask = torch.zeros_like(ids), torch.zeros(ids.shape)
    for i, s in enumerate(seqs):
        n = len(s) - 1  # the last token predicts nothing we need
        ids[i, :n], targets[i, :n] = torch.tensor(s[:-1]), torch.tensor(s[1:])
        if pairs:
            mask[i, len(pairs[i][0]) - 1:n] = 1.0  # position t predicts token t + 1
    return ids, targets, mask


def _forward(m, pairs: list[Pair], temperature: float):
    """One forward of a micro-batch: per position, the logprob of the next token and the entropy
    (each [b, s]), and the mask of response positions."""
    ids, targets, mask = (t.to(device()) for t in _rows(pairs, ps.get_tensor_model_parallel_world_size()))
    b, s = ids.shape
    hidden = hidden_tokens(m, ids, torch.arange(s, device=ids.device).expand(b, s), None)
    logprob, entropy = logprob_entropy(hidden, m.output_weight(), flat(targets), temperature=temperature,
                                       loss_mask=flat(mask), **head_args(m))
    return logprob.view(s, b).transpose(0, 1), entropy.view(s, b).transpose(0, 1), mask


def _entropy_sums(m, pairs: list[Pair], temperature: float) -> list[tuple[float, int]]:
    """Per pair of a micro-batch: (sum of its response tokens' entropies, their count)."""
    _, entropy, mask = _forward(m, pairs, temperature)
    sums = (entropy * mask).sum(1).tolist()
    return [(sums[i], len(r)) for i, (_, r) in enumerate(pairs)]


@torch.no_grad()
def response_logprobs(model, pairs: list[Pair]) -> list[list[float]]:
    """Collective, the same few pairs on every rank, one forward: the model's logprob of each
    response token under softmax(logits) (what an engine reports for greedy samples)."""
    m = unwrap(model)
    was_training = m.training
    m.eval()
    logprob, _, _ = _forward(m, pairs, 1.0)
    m.train(was_training)
    return [logprob[i, len(p) - 1:len(p) - 1 + len(r)].tolist() for i, (p, r) in enumerate(pairs)]


@torch.no_grad()
def response_entropies(model, pairs: list[Pair], temperature: float, micro_batch: int) -> list[tuple[float, int]]:
    """Collective over all ranks (TP collectives, MoE all-to-all): every rank runs the same number
    of forwards. This data-parallel rank takes pairs[dp_rank::dp] (ranks of one TP group pass the
    same pairs) and returns, in that order, (sum of token entropies, number of tokens) per
    response. Pairs of similar length share a micro-batch, so little of a forward is padding.
    The model (a LingModel, or Megatron's DDP around one) keeps its training mode."""
    m = unwrap(model)
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = pairs[rank::dp]
    order = sorted(range(len(mine)), key=lambda i: len(mine[i][0]) + len(mine[i][1]))
    batches = [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]
    out: list[tuple[float, int]] = [(0.0, 0)] * len(mine)
    was_training = m.training
    m.eval()
    step = 0
    while any_rank(step < len(batches)):
        idx = batches[step] if step < len(batches) else []
        for i, result in zip(idx, _entropy_sums(m, [mine[i] for i in idx], temperature)):
            out[i] = result
        step += 1
    m.train(was_training)
    return out
