"""The RL update through Megatron's forward-backward schedule: the model returns its final hidden
states and the fused C3PO loss kernel computes logprob, entropy, clipped ratio and KL from them
and the vocabulary-parallel output weight, without a [tokens, vocabulary] logits tensor.

The loss of a step is -(1/D) * sum_t w_t * objective_t (rl/loss_modes.py: the per-token weight w
is in the batch, the divisor D is an argument). Megatron's per-token-loss mode divides the step's
summed gradients by the sum of the counts its micro-batches return (all-reduced over the data-
parallel group, in finalize_model_grads): each micro-batch returns its weighted sum and its share
of D, so D is exactly the divisor applied, once, by Megatron itself. Megatron's MoE router losses
are divided by the same D.

Every forward replays the batch's `replay` routing when it has one (rl.router_replay,
models/router_replay.py). Each step reports the train-inference mismatch on its loss tokens: the
logprob gap, the multiplicative probability error and the KL between the rollout and trainer
distributions, and with routed experts the routing agreement, each also as its worst micro-batch."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ring.models.lm_head import flat, head_args, hidden_tokens, unwrap
from megatron_ring.models.router_replay import routing_of
from megatron_ring.ops import fused_c3po_loss, logprob_entropy
from megatron_ring.rl.rl_batch import RLBatch

# Per-step sums every micro-batch reports; means are taken over the step's loss tokens, the
# routing counts over its (loss token, MoE layer) pairs with a known rollout routing.
_SUMS = ("loss", "tokens", "entropy", "kl", "clip_low", "clip_high", "logprob_gap", "ratio", "prob_error",
         "rollout_kl", "is_masked", "route_pairs", "route_used", "route_natural")
# Per micro-batch, the step reports the worst: mean gap, probability error, KL, and routing
# disagreement (1 - agreement), maxed over micro-batches and data-parallel ranks.
_WORST = ("logprob_gap_max", "prob_error_max", "rollout_kl_max", "routing_disagreement_max")


@dataclass(frozen=True)
class LossConfig:
    divisor: int  # D of the loss mode (rl/loss_modes.py)
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0  # KL to the reference
    entropy_coef: float = 0.0
    temperature: float = 1.0  # the rollout temperature: logprobs are of the sampled distribution
    tis_cap: float = 0.0  # truncated importance sampling against the rollout logprobs; 0: off
    is_mask: str = "off"  # masked importance sampling: off, token or sequence (ops/c3po_objective.py)
    is_mask_low: float = 0.5
    is_mask_high: float = 2.0

    def __post_init__(self):
        if int(self.divisor) != self.divisor or self.divisor <= 0:
            raise ValueError(f"divisor must be a positive integer (Megatron counts it), got {self.divisor}")


@torch.no_grad()
def token_logprobs(model, batches: list[RLBatch], temperature: float, routing_out: list | None = None
                   ) -> list[torch.Tensor]:
    """logp [b, s] of every next token under the model (the old policy or the reference), one
    forward per micro-batch replaying the batch's `replay` routing; every rank runs the same
    number (collectives inside). routing_out: gets the experts each forward used, uint8
    [b, s, layers, top_k] per batch (the old pass's routing, which r2 replays)."""
    m = unwrap(model)
    was_training = m.training
    m.eval()
    out = []
    routing = routing_of(model)
    try:
        for batch in batches:
            routing.set_target(batch.replay)
            hidden = hidden_tokens(model, batch.input_ids, batch.positions(), batch.doc_ids)
            logp, _ = logprob_entropy(hidden, m.output_weight(), flat(batch.labels), temperature=temperature,
                                      **head_args(model))
            b, s = batch.input_ids.shape
            out.append(logp.view(s, b).transpose(0, 1).contiguous())
            if routing_out is not None:
                routing_out.append(routing.chosen(b, gather=True))
    finally:
        routing.set_target(None)
    m.train(was_training)
    return out


def divisor_shares(divisor: int, dp: int, dp_rank: int, n_micro: int) -> list[int]:
    """This rank's micro-batches' shares of D: integers (Megatron sums counts as int) that add
    up to D over all micro-batches of all data-parallel ranks, which run the same number."""
    parts = dp * n_micro
    first = dp_rank * n_micro
    return [divisor * (k + 1) // parts - divisor * k // parts for k in range(first, first + n_micro)]


def mismatch_terms(train_logp: torch.Tensor, rollout_logp: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """[3, T], 0 off the live tokens. With d = log(pi_train/pi_rollout) of each sampled token:
    |d|, the logprob gap; exp|d| - 1, the multiplicative probability error; exp(d) - 1 - d, the
    k3 estimate of KL(pi_rollout || pi_train) from the rollout's own samples (>= 0)."""
    d = torch.where(live != 0, train_logp - rollout_logp, 0.0)
    return torch.stack([d.abs(), torch.expm1(d.abs()), torch.expm1(d) - d]) * live


def _sequence_ids(batch: RLBatch) -> torch.Tensor:
    """The response each token belongs to, for the sequence-level IS mask: a packed row's
    documents, else the row; [s*b] in the loss's token order."""
    if batch.doc_ids is not None:
        return flat(batch.doc_ids)
    b, s = batch.input_ids.shape
    return flat(torch.arange(b, device=batch.input_ids.device)[:, None].expand(b, s))


def _loss_func(batch: RLBatch, cfg: LossConfig, share: int, model, hidden: torch.Tensor):
    m = unwrap(model)
    w = flat(batch.weights)
    seq = _sequence_ids(batch) if cfg.is_mask == "sequence" else None
    # normalizer 1: the kernel returns -sum_t w_t * objective_t; D is applied by Megatron (above).
    out = fused_c3po_loss(hidden, m.output_weight(), flat(batch.labels), flat(batch.advantages), w,
                          flat(batch.old_logp), flat(batch.ref_logp), normalizer=1.0,
                          eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
                          entropy_coef=cfg.entropy_coef, temperature=cfg.temperature,
                          rollout_logp=flat(batch.rollout_logp), tis_cap=cfg.tis_cap, is_mask=cfg.is_mask,
                          is_mask_low=cfg.is_mask_low, is_mask_high=cfg.is_mask_high, seq_ids=seq,
                          **head_args(model))
    live = (w != 0).float()
    n = live.sum()
    # The trainer-vs-engine mismatch, from the old pass, or (one PPO epoch, no old pass) from
    # this forward's own logprobs, which are then the old policy's.
    old = flat(batch.old_logp) if batch.old_logp is not None else out.logp
    mismatch = mismatch_terms(old, flat(batch.rollout_logp), live)
    routes = torch.zeros(3, device=w.device, dtype=torch.float64)
    if batch.routing is not None:  # agreement on the positions whose outputs carry loss
        routes = routing_of(model).agreement(batch.routing, batch.weights != 0)
    parts = [torch.stack([out.loss.detach() / cfg.divisor, n, (out.entropy * live).sum(), (out.kl * live).sum(),
                          out.clip_low_frac * n, out.clip_high_frac * n]),
             mismatch[0:1].sum(-1), (out.ratio * live).sum()[None], mismatch[1:].sum(-1),
             (out.is_masked * live).sum()[None], routes]
    report = torch.cat([p.double() for p in parts])  # float64: counts past 2**24 stay exact
    # A micro-batch with nothing to compare (a dummy, no known routing) disagrees on nothing.
    disagree = (routes[0] - routes[1]) / routes[0].clamp(min=1)
    worst = torch.cat([(mismatch.sum(-1) / n.clamp(min=1)).double(), disagree[None]])
    return (out.loss, torch.tensor(share, dtype=torch.int, device=out.loss.device),
            {"rl": report, "rl_worst": worst})


def _forward_step(cfg: LossConfig, shares, data_iterator, model):
    batch, share = next(data_iterator), next(shares)
    # Replayed in this forward and in its recomputation during the micro-batch's backward.
    routing_of(model).set_target(batch.replay)
    return (hidden_tokens(model, batch.input_ids, batch.positions(), batch.doc_ids),
            partial(_loss_func, batch, cfg, share, model))


def forward_backward(ddp, batches: list[RLBatch], cfg: LossConfig) -> dict:
    """Gradients of the RL loss over this rank's micro-batches; returns the step's metrics,
    summed over the data-parallel group."""
    shares = divisor_shares(int(cfg.divisor), ps.get_data_parallel_world_size(), ps.get_data_parallel_rank(),
                            len(batches))
    b, s = batches[0].input_ids.shape
    try:
        reduced = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, cfg, iter(shares)), data_iterator=iter(batches),
            model=[ddp], num_microbatches=len(batches), seq_length=s, micro_batch_size=b, forward_only=False)
    finally:
        routing_of(ddp).set_target(None)  # the embedded engine samples with this model next
    totals = torch.stack([r["rl"] for r in reduced]).sum(0)
    dist.all_reduce(totals, group=ps.get_data_parallel_group())
    worst = torch.stack([r["rl_worst"] for r in reduced]).amax(0)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
    sums = dict(zip(_SUMS, totals.tolist()))
    if sums["tokens"] == 0:  # before the optimizer steps on gradients of nothing
        raise ValueError("no token carries loss this step")
    n = sums["tokens"]
    out = {"loss": sums["loss"], "tokens_in_loss": int(round(sums["tokens"])),
           "entropy": sums["entropy"] / n, "kl": sums["kl"] / n,
           "clip_frac": (sums["clip_low"] + sums["clip_high"]) / n, "clip_low_frac": sums["clip_low"] / n,
           "clip_high_frac": sums["clip_high"] / n, "logprob_gap": sums["logprob_gap"] / n,
           "ratio_mean": sums["ratio"] / n, "prob_error": sums["prob_error"] / n,
           "rollout_kl": sums["rollout_kl"] / n, "is_masked_frac": sums["is_masked"] / n,
           **dict(zip(_WORST, worst.tolist()))}
    if sums["route_pairs"] > 0:
        out["routing_agreement"] = sums["route_used"] / sums["route_pairs"]
        out["natural_routing_agreement"] = sums["route_natural"] / sums["route_pairs"]
        out["routing_agreement_min"] = 1 - out.pop("routing_disagreement_max")
    else:
        del out["routing_disagreement_max"]
    return out
