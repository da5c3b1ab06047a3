"""The trainer side of an RL step: the policy (the session's model, DDP, optimizer, scheduler), the
frozen reference, the old-policy and reference log-prob passes, truncated importance sampling and
the update. It takes micro-batches and returns metrics; it never waits on a rollout engine.

Old logprobs are recomputed by the trainer on the selected segments just before the update, so
PPO's pi_old is exactly the weights being updated; the gap to the rollout engine's logprobs is
logged, and corrected by truncated importance sampling when rl.tis_cap > 0."""

from __future__ import annotations

from dataclasses import replace

from megatron_ring.rl import policy_loss
from megatron_ring.rl.rl_batch import RLBatch, truncate_importance


class Actor:
    def __init__(self, session, rl, temperature: float):
        """rl: the recipe's rl section; temperature: the rollout's (logprobs of the sampled distribution)."""
        self.session, self.rl, self.temperature = session, rl, temperature

    def with_old_and_ref(self, batches: list[RLBatch]) -> list[RLBatch]:
        """The batches with the current policy's logprobs as pi_old (and the reference's, when
        the loss has a KL term), the importance weights truncated when asked."""
        s = self.session
        old = policy_loss.token_logprobs(s.ddp, batches, self.temperature)
        ref = policy_loss.token_logprobs(s.reference, batches, self.temperature) if s.reference else [None] * len(batches)
        out = [replace(b, old_logp=o, ref_logp=r) for b, o, r in zip(batches, old, ref)]
        return [truncate_importance(b, self.rl.tis_cap) for b in out] if self.rl.tis_cap > 0 else out

    def update(self, batches: list[RLBatch], divisor: int) -> dict:
        """rl.ppo_epochs optimizer steps on the step's micro-batches; the last one's metrics."""
        r = self.rl
        batches = self.with_old_and_ref(batches)
        cfg = policy_loss.LossConfig(divisor, r.eps_low, r.eps_high, r.kl_beta, r.entropy_coef, self.temperature)
        for _ in range(r.ppo_epochs):
            out = self.session.optimizer_step(lambda ddp: policy_loss.forward_backward(ddp, batches, cfg))
        return out
