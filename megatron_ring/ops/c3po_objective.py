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
    On rows with loss_mask 0, ratio is 1 and kl 0 (their inputs are not looked at)."""

    loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    ratio: torch.Tensor
    kl: torch.Tensor
    clip_low_frac: torch.Tensor
    clip_high_frac: torch.Tensor


def c3po_objective(logp, entropy, advantages, loss_mask, old_logp, ref_logp,
                   coef: C3POCoefficients, rollout_logp=None, tis_cap: float = 0.0) -> C3POLossOutput:
    """loss = -(1/Phi) * sum_t mask_t * (min(r A, clip(r) A) - beta*kl_t + entropy_coef*H_t)."""
    mask = loss_mask.float()
    live = mask != 0
    detached = logp.detach()
    if tis_cap > 0:
        # Truncated importance sampling: the rollout engine sampled from a slightly different
        # policy (other kernels, stale weights for carried tokens), so each token's weight is
        # multiplied by min(pi_old / pi_rollout, cap), pi_old being the current policy when the
        # old pass is skipped (one PPO epoch); the cap bounds the correction's variance.
        behaviour = detached if old_logp is None else old_logp.float()
        rollout = torch.where(live, rollout_logp.float(), behaviour)
        mask = mask * torch.exp(behaviour - rollout).clamp(max=tis_cap)
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
    # number of tokens present in this micro-batch nor any per-response length.
    loss = -(torch.where(live, objective, 0.0) * mask).sum() / coef.normalizer
    # The min picks the clipped branch above 1+eps_high for A>0 and below 1-eps_low for A<0.
    r = ratio.detach()
    n = live.sum().clamp(min=1)
    clip_high = (live & (adv > 0) & (r > 1.0 + coef.eps_high)).sum() / n
    clip_low = (live & (adv < 0) & (r < 1.0 - coef.eps_low)).sum() / n
    return C3POLossOutput(loss, detached, entropy.detach(), r, kl, clip_low, clip_high)
