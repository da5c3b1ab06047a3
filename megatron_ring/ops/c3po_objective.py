"""The C3PO objective on per-token log-probabilities and entropies (paper Eq. 2 and 4-6).

Works on [T] vectors only, so the fused kernels and the naive reference share it and autograd
carries its gradient back to logp and entropy, from where the fused backward takes over."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class C3POCoefficients:
    normalizer: float  # Phi, C3PO's fixed token budget
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0  # KL weight
    entropy_coef: float = 0.0

    def __post_init__(self):
        if not self.normalizer > 0:
            raise ValueError(f"normalizer must be > 0 (C3PO's token budget Phi), got {self.normalizer}")
        for name in ("eps_low", "eps_high", "beta", "entropy_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eps_low >= 1:
            raise ValueError(f"eps_low must be < 1 (clip range [1-eps_low, 1+eps_high]), got {self.eps_low}")


@dataclass
class C3POLossOutput:
    """loss carries the gradient; everything else is detached, per token [T] or a scalar.
    On rows with loss_mask 0, ratio is 1 and kl 0 (their inputs are not looked at).
    is_masked [T] float: 1 on a live token that the IS mask gave weight 0, 0 elsewhere (all 0
    with is_mask "off"); its sum over the live tokens is the masked share's numerator."""

    loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    ratio: torch.Tensor
    kl: torch.Tensor
    clip_low_frac: torch.Tensor
    clip_high_frac: torch.Tensor
    is_masked: torch.Tensor


IS_MASK_MODES = ("off", "token", "sequence")


def check_is_args(rollout_logp, tis_cap: float, is_mask: str, is_mask_low: float, is_mask_high: float,
                  seq_ids) -> None:
    """The importance-sampling arguments (truncated weights, masking), checked before any work."""
    if tis_cap > 0 and rollout_logp is None:
        raise ValueError("tis_cap > 0 needs rollout_logp")
    if is_mask not in IS_MASK_MODES:
        raise ValueError(f"is_mask must be one of {IS_MASK_MODES}, got {is_mask!r}")
    if is_mask == "off":
        return
    if rollout_logp is None:
        raise ValueError(f"is_mask={is_mask!r} needs rollout_logp")
    if not 0.0 <= is_mask_low < 1.0 < is_mask_high:
        raise ValueError("the is_mask band must satisfy 0 <= is_mask_low < 1 < is_mask_high, "
                         f"got [{is_mask_low}, {is_mask_high}]")
    if is_mask == "sequence":
        if seq_ids is None:
            raise ValueError("is_mask='sequence' needs seq_ids (the sequence each token belongs to)")
        if seq_ids.dtype.is_floating_point or seq_ids.dtype.is_complex or seq_ids.dtype == torch.bool:
            raise ValueError(f"seq_ids must be an integer tensor, got {seq_ids.dtype}")


def _sequence_mean(values: torch.Tensor, live: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """Per token, the mean of `values` over the live tokens of its sequence (fp64 sums; one host
    sync for the number of distinct ids). Rows without loss neither count nor contribute."""
    ids, seq = torch.unique(seq_ids, return_inverse=True)
    n_seq = ids.numel()
    zeros = values.new_zeros(n_seq, dtype=torch.float64)
    total = zeros.index_add(0, seq, torch.where(live, values, 0.0).double())
    count = zeros.index_add(0, seq, live.double())
    return (total / count.clamp(min=1.0))[seq]


def c3po_objective(logp, entropy, advantages, loss_mask, old_logp, ref_logp,
                   coef: C3POCoefficients, rollout_logp=None, tis_cap: float = 0.0, *,
                   is_mask: str = "off", is_mask_low: float = 0.5, is_mask_high: float = 2.0,
                   seq_ids=None) -> C3POLossOutput:
    """loss = -(1/Phi) * sum_t w_t * (min(r A, clip(r) A) - beta*kl_t + entropy_coef*H_t), with
    w_t = loss_mask_t, times the truncated IS weight (tis_cap > 0), times 0 where the IS mask
    (is_mask "token" or "sequence") drops the token."""
    check_is_args(rollout_logp, tis_cap, is_mask, is_mask_low, is_mask_high, seq_ids)
    mask = loss_mask.float()
    live = mask != 0
    detached = logp.detach()
    is_masked = torch.zeros_like(detached)
    if tis_cap > 0 or is_mask != "off":
        # The rollout engine sampled from a slightly different policy (other kernels, stale
        # weights for carried tokens): rho_t = pi_behaviour / pi_rollout = exp(behaviour_t -
        # rollout_t), pi_behaviour being pi_old, or the current policy when the old pass is
        # skipped (one PPO epoch). Rows without loss get log rho = 0 (their inputs are not read).
        behaviour = detached if old_logp is None else old_logp.float()
        log_rho = torch.where(live, behaviour - rollout_logp.float(), 0.0)
    if tis_cap > 0:
        # Truncated importance sampling: each token's weight is multiplied by min(rho_t, cap);
        # the cap bounds the correction's variance.
        mask = mask * torch.exp(log_rho).clamp(max=tis_cap)
    if is_mask != "off":
        if is_mask == "token":
            # Token masking: a live token whose rho_t lies outside [low, high] gets weight 0.
            band_rho = torch.exp(log_rho)
        else:
            # Sequence masking: every live token of sequence s gets weight 0 when its geometric-
            # mean ratio exp((1/n_s) * sum_{t in s} log rho_t) lies outside [low, high], n_s
            # being the number of live tokens of s. A sequence is a seq_ids value in this
            # micro-batch: a response that C3PO cut (the rest of it in another micro-batch or
            # step) is judged on its segment here alone.
            band_rho = torch.exp(_sequence_mean(log_rho, live, seq_ids))
        # "Outside" is "not inside", so a NaN ratio is masked too.
        dropped = live & ~((band_rho >= is_mask_low) & (band_rho <= is_mask_high))
        # Applied after the TIS weight; the weight becomes exactly 0, so the token's loss and
        # gradient are exactly 0.
        mask = torch.where(dropped, 0.0, mask)
        is_masked = dropped.float()
    # Rows outside the mask get neutral inputs (A=0, r=1, kl=0): their terms are then finite and
    # their gradient exactly zero, whatever the caller left in them (NaN advantages, -inf logps).
    adv = torch.where(live, advantages.float(), 0.0)
    old = detached if old_logp is None else torch.where(live, old_logp.float(), detached)
    # On-policy (old_logp None): r = exp(logp - logp.detach()) = 1, with PPO's first-epoch gradient.
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1.0 - coef.eps_low, 1.0 + coef.eps_high)
    surrogate = torch.minimum(ratio * adv, clipped * adv)
    objective = surrogate + coef.entropy_coef * entropy  # the entropy bonus encourages exploration
    kl = torch.zeros_like(detached)
    if ref_logp is not None and coef.beta != 0:
        # k3 estimator of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = ref - logp, >= 0.
        delta = torch.where(live, ref_logp.float(), detached) - logp
        kl_term = torch.exp(delta) - delta - 1.0
        objective = objective - coef.beta * kl_term
        kl = kl_term.detach()
    # C3PO's homogeneous gradient scaling: the divisor is the constant token budget Phi, not the
    # number of tokens present in this micro-batch nor any per-response length; in particular
    # tokens dropped by the IS mask are not renormalised away (the divisor does not shrink).
    loss = -(torch.where(live, objective, 0.0) * mask).sum() / coef.normalizer
    # The min picks the clipped branch above 1+eps_high for A>0 and below 1-eps_low for A<0.
    r = ratio.detach()
    n = live.sum().clamp(min=1)
    clip_high = (live & (adv > 0) & (r > 1.0 + coef.eps_high)).sum() / n
    clip_low = (live & (adv < 0) & (r < 1.0 - coef.eps_low)).sum() / n
    return C3POLossOutput(loss, detached, entropy.detach(), r, kl, clip_low, clip_high, is_masked)
