"""The RL update through Megatron's forward-backward schedule: the model returns its final hidden
states and the fused C3PO loss kernel computes logprob, entropy, clipped ratio and KL from them
and the vocabulary-parallel output weight, without a [tokens, vocabulary] logits tensor.

One objective serves the three loss modes; they differ only in the per-token weight w and the
constant divisor D of -(1/D) * sum_t w_t * objective_t:
  c3po        w = 1,      D = Phi, the fixed token budget (the same every step);
  grpo        w = 1/|y|,  D = the number of responses (a mean of per-response means);
  token_mean  w = 1,      D = the tokens in the step (DAPO's token-level mean)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ring.platform.distributed import device
from megatron_ring.ops import fused_c3po_loss, logprob_entropy
from megatron_ring.rl.rl_batch import RLBatch

LOSS_MODES = ("c3po", "grpo", "token_mean")
# Per-step sums every micro-batch reports; means are taken over the step's loss tokens.
_SUMS = ("loss", "tokens", "entropy", "kl", "clip_low", "clip_high", "logprob_gap", "ratio")


@dataclass(frozen=True)
class LossConfig:
    divisor: float  # D above
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0  # KL to the reference
    entropy_coef: float = 0.0
    temperature: float = 1.0  # the rollout temperature: logprobs are of the sampled distribution


@contextmanager
def hidden_states_out(model):
    """Make GPTModel.forward return the final (normed) hidden states [s(/tp), b, h] instead of
    logits: Megatron stops before the output layer when post_process is off."""
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = True


def _unwrap(model):
    return getattr(model, "module", model)


def _flat(x: torch.Tensor | None) -> torch.Tensor | None:
    """[b, s] -> [s*b] in the order of Megatron's flattened [s, b, h] hidden states."""
    return None if x is None else x.transpose(0, 1).reshape(-1).contiguous()


def _kernel_args(model):
    m = _unwrap(model)
    return dict(tp_group=ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None,
                true_vocab_size=m.arch.vocab_size, sequence_parallel=m.config.sequence_parallel)


def _hidden(model, batch: RLBatch) -> torch.Tensor:
    m = _unwrap(model)
    with hidden_states_out(m):
        h = model(batch.input_ids, batch.positions(), None)
    return h.reshape(-1, h.shape[-1])


@torch.no_grad()
def token_logprobs(model, batches: list[RLBatch], temperature: float) -> list[torch.Tensor]:
    """logp [b, s] of every next token under the model (the old policy or the reference), one
    forward per micro-batch; every rank runs the same number (collectives inside)."""
    m = _unwrap(model)
    was_training = m.training
    m.eval()
    out = []
    for batch in batches:
        logp, _ = logprob_entropy(_hidden(model, batch), m.output_weight(), _flat(batch.labels),
                                  temperature=temperature, **_kernel_args(model))
        b, s = batch.input_ids.shape
        out.append(logp.view(s, b).transpose(0, 1).contiguous())
    m.train(was_training)
    return out


def _loss_func(batch: RLBatch, cfg: LossConfig, model, global_tokens: int, hidden: torch.Tensor):
    m = _unwrap(model)
    w = _flat(batch.weights)
    out = fused_c3po_loss(hidden, m.output_weight(), _flat(batch.labels), _flat(batch.advantages), w,
                          _flat(batch.old_logp), _flat(batch.ref_logp), normalizer=cfg.divisor,
                          eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
                          entropy_coef=cfg.entropy_coef, temperature=cfg.temperature, **_kernel_args(model))
    live = (w != 0).float()
    n = live.sum()
    gap = (_flat(batch.old_logp) - _flat(batch.rollout_logp)).abs() if batch.old_logp is not None else torch.zeros_like(w)
    report = torch.stack([out.loss.detach(), n, (out.entropy * live).sum(), (out.kl * live).sum(),
                          out.clip_low_frac * n, out.clip_high_frac * n, (gap * live).sum(), (out.ratio * live).sum()])
    # Megatron (per-token-loss mode) divides the summed gradients by the all-reduced count we
    # return; multiplying by the same global count leaves the mode's own divisor D in force.
    return out.loss * global_tokens, n.to(torch.int), {"rl": report}


def _forward_step(cfg: LossConfig, global_tokens: int, data_iterator, model):
    batch = next(data_iterator)
    hidden = _hidden(model, batch)
    return hidden, partial(_loss_func, batch, cfg, model, global_tokens)


def forward_backward(ddp, batches: list[RLBatch], cfg: LossConfig) -> dict:
    """Gradients of the RL loss over this rank's micro-batches; returns the step's metrics,
    summed over the data-parallel group."""
    local = torch.tensor([b.loss_tokens for b in batches], dtype=torch.long, device=device()).sum()
    dist.all_reduce(local, group=ps.get_data_parallel_group())
    global_tokens = int(local)
    if global_tokens == 0:
        raise ValueError("no token carries loss this step")
    b, s = batches[0].input_ids.shape
    reduced = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, cfg, global_tokens), data_iterator=iter(batches),
        model=[ddp], num_microbatches=len(batches), seq_length=s, micro_batch_size=b, forward_only=False)
    totals = torch.stack([r["rl"] for r in reduced]).sum(0)
    dist.all_reduce(totals, group=ps.get_data_parallel_group())
    sums = dict(zip(_SUMS, totals.tolist()))
    n = max(sums["tokens"], 1.0)
    return {"loss": sums["loss"], "tokens_in_loss": int(round(sums["tokens"])),
            "entropy": sums["entropy"] / n, "kl": sums["kl"] / n,
            "clip_frac": (sums["clip_low"] + sums["clip_high"]) / n, "clip_low_frac": sums["clip_low"] / n,
            "clip_high_frac": sums["clip_high"] / n, "logprob_gap": sums["logprob_gap"] / n,
            "ratio_mean": sums["ratio"] / n}
