"""Worker: the RL loss through Megatron's schedule at a TP/EP layout, on fixed segments split into
balanced micro-batches (rows, or --max-tokens > 0: token-sized micro-batches packed into one
row); saves the loss, metrics and HF-named gradients (rank 0)."""

import random
from dataclasses import replace

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_ring.models.builder import build_model
from megatron_ring.models.weights import hf_state_dict, load_hf
from megatron_ring.platform import distributed
from megatron_ring.rl import policy_loss, rank_balance, rl_batch
from megatron_ring.rl.responses import Response, Segment
from megatron_ring.train.engine import wrap_ddp
from tests.workers import start_model_worker

PHI = 50
CFG = dict(eps_low=0.2, eps_high=0.25, beta=0.1, entropy_coef=0.01)


def fixed_segments(vocab: int) -> list[Segment]:
    """Six responses of varying lengths; two of them cut (a C3PO prefix and a carried remainder)."""
    rng = random.Random(3)
    segs = []
    for uid in range(6):
        n = rng.randint(4, 12)
        r = Response(uid, uid // 3, "math", [rng.randrange(2, vocab) for _ in range(rng.randint(3, 6))],
                     [rng.randrange(2, vocab) for _ in range(n)], [-1.0] * n)
        r.advantage = rng.uniform(-1.5, 1.5)
        segs.append(Segment(r, 0, n - 2) if uid == 2 else Segment(r, 3, n) if uid == 4 else Segment(r))
    return segs


def offset(labels: torch.Tensor, positions: torch.Tensor, scale: float, phase: float) -> torch.Tensor:
    """A deterministic per-(position in the segment, token) shift, so old/ref logprobs differ from
    the current ones and both clip branches and the KL are exercised."""
    return scale * torch.sin(labels.float() * 0.7 + positions.float() * 1.3 + phase)


def main():
    a, layout, reader = start_model_worker(__doc__, micro_batch=2, max_tokens=0)
    model = build_model(reader.arch, layout)
    load_hf(model, reader)
    ddp = wrap_ddp(model, use_distributed_optimizer=False)
    segs = fixed_segments(reader.arch.vocab_size)
    mine = rank_balance.plan([segs], ps.get_data_parallel_world_size(), a.micro_batch, per_rank=False,
                             max_tokens=a.max_tokens)[ps.get_data_parallel_rank()]
    batches = [rl_batch.build(mb, 1, layout.tp, per_response_norm=False, packed=a.max_tokens > 0) for mb in mine]
    batches = [replace(b, old_logp=logp + offset(b.labels, b.positions(), 0.4, 0.0),
                       ref_logp=logp + offset(b.labels, b.positions(), 0.5, 1.0))
               for b, logp in zip(batches, policy_loss.token_logprobs(ddp, batches, 1.0))]
    out = policy_loss.forward_backward(ddp, batches, policy_loss.LossConfig(PHI, **CFG))
    grads = hf_state_dict(model, value=lambda n, p: p.main_grad)
    if dist.get_rank() == 0:
        torch.save({"out": out, "grads": grads}, a.out)
    distributed.shutdown()


if __name__ == "__main__":
    main()
