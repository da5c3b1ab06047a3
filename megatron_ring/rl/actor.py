"""The trainer side of an RL step: the policy (the session's model, DDP, optimizer, scheduler), the
frozen reference, the old-policy and reference log-prob passes, truncated importance sampling and
the update. It takes micro-batches and returns metrics; it never waits on a rollout engine.

Old logprobs are recomputed by the trainer on the selected segments just before the update, so
PPO's pi_old is exactly the weights being updated. With one PPO epoch that pass is skipped: the
update's own forward runs on exactly those weights, so pi_old = pi_theta (ratio 1, the loss op's
on-policy path), and a full forward (about a fifth of the step's training FLOPs) is saved. The
gap to the rollout engine's logprobs is logged either way, and corrected by truncated importance
sampling when rl.tis_cap > 0. With rl.reference_offload the frozen reference waits in host memory
between its passes."""

from __future__ import annotations

from dataclasses import replace

from megatron_ring.rl import policy_loss
from megatron_ring.rl.rl_batch import RLBatch
from megatron_ring.train.offload import HostCopies


class Actor:
    def __init__(self, session, rl, temperature: float):
        """rl: the recipe's rl section; temperature: the rollout's (logprobs of the sampled distribution)."""
        self.session, self.rl, self.temperature = session, rl, temperature
        self.reference_copies = None
        if rl.reference_offload and session.reference is not None:
            self.reference_copies = HostCopies()
            self.reference_copies.move_out(reference_tensors(session.reference))

    def with_old_and_ref(self, batches: list[RLBatch]) -> list[RLBatch]:
        """The batches with the current policy's logprobs as pi_old when more than one PPO epoch
        needs them, and the reference's when the loss has a KL term."""
        s, n = self.session, len(batches)
        old = policy_loss.token_logprobs(s.ddp, batches, self.temperature) if self.rl.ppo_epochs > 1 else [None] * n
        ref = self.reference_logprobs(batches) if s.reference is not None else [None] * n
        return [replace(b, old_logp=o, ref_logp=r) for b, o, r in zip(batches, old, ref)]

    def reference_logprobs(self, batches: list[RLBatch]) -> list:
        if self.reference_copies is not None:
            self.reference_copies.move_back()
        try:
            return policy_loss.token_logprobs(self.session.reference, batches, self.temperature)
        finally:
            if self.reference_copies is not None:
                self.reference_copies.move_out(reference_tensors(self.session.reference))

    def update(self, batches: list[RLBatch], divisor: int) -> dict:
        """rl.ppo_epochs optimizer steps on the step's micro-batches; the last one's metrics."""
        r = self.rl
        batches = self.with_old_and_ref(batches)
        cfg = policy_loss.LossConfig(divisor, r.eps_low, r.eps_high, r.kl_beta, r.entropy_coef, self.temperature,
                                     r.tis_cap)
        for _ in range(r.ppo_epochs):
            out = self.session.optimizer_step(lambda ddp: policy_loss.forward_backward(ddp, batches, cfg))
        return out


def reference_tensors(reference) -> list:
    return [*reference.parameters(), *reference.buffers()]
