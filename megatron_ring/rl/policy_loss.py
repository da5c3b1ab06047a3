"""The RL update through Megatron's forward-backward schedule: the model returns its final hidden
states and the fused C3PO loss kernel computes logprob, entropy, clipped ratio and KL from them
and the vocabulary-parallel output weight, without a [tokens, vocabulary] logits tensor.

The loss of a step is -(1/D) * sum_t w_t * objective_t (rl/loss_modes.py: the per-token weight w
is in the batch, the divisor D is an argument). Megatron's per-token-loss mode divides the step's
summed gradients by the sum of the counts its micro-batches return (all-reduced over the data-
parallel group, in finalize_model_grads): each micro-batch returns its weighted sum and its share
of D, so D is exactly the divisor applied, once, by Megatron itself. Megatron's MoE router losses
are divided by the same D."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ring.ops import fused_c3po_loss, logprob_entropy
from megatron_ring.rl.rl_batch import RLBatch
from megatron_ring.models.lm_head import flat, head_args, hidden_tokens, unwrap

# Per-step sums every micro-batch reports; means are taken over the step's loss tokens.
_SUMS = ("loss", "tokens", "entropy", "kl", "clip_low", "clip_high", "logprob_gap", "ratio")


@dataclass(frozen=True)
class LossConfig:
    divisor: int  # D of the loss mode (rl/loss_modes.py)
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0  # KL to the reference
    entropy_coef: float = 0.0
    temperature: float = 1.0  # the rollout temperature: logprobs are of the sampled distribution
    tis_cap: float = 0.0  # truncated importance sampling against the rollout logprobs; 0: off

    def __post_init__(self):
        if int(self.divisor) != self.divisor or self.divisor <= 0:
            raise ValueError(f"divisor must be a positive integer (Megatron counts it), got {self.divisor}")


@torch.no_grad()
def token_logprobs(model, batches: list[RLBatch], temperature: float) -> list[torch.Tensor]:
    """logp [b, s] of every next token under the model (the old policy or the reference), one
    forward per micro-batch; every rank runs the same number (collectives inside)."""
    m = unwrap(model)
    was_training = m.training
    m.eval()
    out = []
    for batch in batches:
        hidden = hidden_tokens(model, batch.input_ids, batch.positions(), batch.doc_ids)
        logp, _ = logprob_entropy(hidden, m.output_weight(), flat(batch.labels), temperature=temperature,
                                  **head_args(model))
        b, s = batch.input_ids.shape
        out.append(logp.view(s, b).transpose(0, 1).contiguous())
    m.train(was_training)
    return out


def divisor_shares(divisor: int, dp: int, dp_rank: int, n_micro: int) -> list[int]:
    """This rank's micro-batches' shares of D: integers (Megatron sums counts as int) that add
    up to D over all micro-batches of all data-parallel ranks, which run the same number."""
    parts = dp * n_micro
    first = dp_rank * n_micro
    return [divisor * (k + 1) // parts - divisor * k // parts for k in range(first, first + n_micro)]


def _loss_func(batch: RLBatch, cfg: LossConfig, share: int, model, hidden: torch.Tensor):
    m = unwrap(model)
    w = flat(batch.weights)
    # normalizer 1: the kernel returns -sum_t w_t * objective_t; D is applied by Megatron (above).
    out = fused_c3po_loss(hidden, m.output_weight(), flat(batch.labels), flat(batch.advantages), w,
                          flat(batch.old_logp), flat(batch.ref_logp), normalizer=1.0,
                          eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
                          entropy_coef=cfg.entropy_coef, temperature=cfg.temperature,
                          rollout_logp=flat(batch.rollout_logp), tis_cap=cfg.tis_cap, **head_args(model))
    live = (w != 0).float()
    n = live.sum()
    # The trainer-vs-engine gap, from the old pass, or (one PPO epoch, no old pass) from this
    # forward's own logprobs, which are then the old policy's.
    old = flat(batch.old_logp) if batch.old_logp is not None else out.logp
    gap = torch.where(live != 0, old - flat(batch.rollout_logp), 0.0).abs()
    report = torch.stack([out.loss.detach() / cfg.divisor, n, (out.entropy * live).sum(), (out.kl * live).sum(),
                          out.clip_low_frac * n, out.clip_high_frac * n, (gap * live).sum(), (out.ratio * live).sum()])
    return out.loss, torch.tensor(share, dtype=torch.int, device=out.loss.device), {"rl": report}


def _forward_step(cfg: LossConfig, shares, data_iterator, model):
    batch, share = next(data_iterator), next(shares)
    return (hidden_tokens(model, batch.input_ids, batch.positions(), batch.doc_ids),
            partial(_loss_func, batch, cfg, share, model))


def forward_backward(ddp, batches: list[RLBatch], cfg: LossConfig) -> dict:
    """Gradients of the RL loss over this rank's micro-batches; returns the step's metrics,
    summed over the data-parallel group."""
    shares = divisor_shares(int(cfg.divisor), ps.get_data_parallel_world_size(), ps.get_data_parallel_rank(),
                            len(batches))
    b, s = batches[0].input_ids.shape
    reduced = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, cfg, iter(shares)), data_iterator=iter(batches),
        model=[ddp], num_microbatches=len(batches), seq_length=s, micro_batch_size=b, forward_only=False)
    totals = torch.stack([r["rl"] for r in reduced]).sum(0)
    dist.all_reduce(totals, group=ps.get_data_parallel_group())
    sums = dict(zip(_SUMS, totals.tolist()))
    if sums["tokens"] == 0:  # before the optimizer steps on gradients of nothing
        raise ValueError("no token carries loss this step")
    n = sums["tokens"]
    return {"loss": sums["loss"], "tokens_in_loss": int(round(sums["tokens"])),
            "entropy": sums["entropy"] / n, "kl": sums["kl"] / n,
            "clip_frac": (sums["clip_low"] + sums["clip_high"]) / n, "clip_low_frac": sums["clip_low"] / n,
            "clip_high_frac": sums["clip_high"] / n, "logprob_gap": sums["logprob_gap"] / n,
            "ratio_mean": sums["ratio"] / n}
