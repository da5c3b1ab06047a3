"""The trainer side of an RL step: the policy (the session's model, DDP, optimizer, scheduler), the
frozen reference, the old-policy and reference log-prob passes, truncated importance sampling and
the update. It takes micro-batches and returns metrics; it never waits on a rollout engine.

Old logprobs are recomputed by the trainer on the selected segments just before the update, so
PPO's pi_old is exactly the weights being updated. With one PPO epoch that pass is skipped: the
update's own forward runs on exactly those weights, so pi_old = pi_theta (ratio 1, the loss op's
on-policy path), and a full forward (about a fifth of the step's training FLOPs) is saved. The
gap to the rollout engine's logprobs is logged either way, and corrected by truncated importance
sampling when rl.tis_cap > 0 and masked by rl.is_mask. With rl.reference_offload the frozen
reference waits in host memory between its passes.

rl.router_replay: r3 replays the rollout engine's routing in the old, reference and training
passes; r2 records the old pass's routing and replays it in training (the reference routes itself)."""

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
        needs them, the reference's when the loss has a KL term, and the routing to replay."""
        s, n, mode = self.session, len(batches), self.rl.router_replay
        if mode == "r3":
            batches = [replace(b, replay=b.routing) for b in batches]
        old_routing = [] if mode == "r2" else None
        old = ([None] * n if self.rl.ppo_epochs == 1 else
               policy_loss.token_logprobs(s.ddp, batches, self.temperature, routing_out=old_routing))
        ref = self.reference_logprobs(batches) if s.reference is not None else [None] * n
        batches = [replace(b, old_logp=o, ref_logp=r) for b, o, r in zip(batches, old, ref)]
        if mode == "r2":
            batches = [replace(b, replay=r) for b, r in zip(batches, old_routing)]
        return batches

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
                                     r.tis_cap, r.is_mask, r.is_mask_low, r.is_mask_high)
        for _ in range(r.ppo_epochs):
            out = self.session.optimizer_step(lambda ddp: policy_loss.forward_backward(ddp, batches, cfg))
        return out


def reference_tensors(reference) -> list:
    return [*reference.parameters(), *reference.buffers()]
