"""Worker: rollout routing replay (R3) at a TP/EP layout. The embedded engine samples a few
responses (fp32, or under bf16 autocast with --bf16 1) and keeps their routed experts; the
training passes then replay them: the forward-only pass (token_logprobs, capturing the experts
each forward used) and the RL loss through Megatron's schedule, on padded rows or packed rows
(--max-tokens > 0), with a C3PO-cut prefix and a carried remainder among the segments. The same
passes without replay give the trainer's natural routing, which replayed (r2) gives the same
experts and log-probs again; the actor hands the training forward the old pass's routing under r2, the
rollout's under r3. Rank 0 saves a JSON of the checks."""

import json
from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.models.builder import build_model
from megatron_ring.models.router_replay import UNKNOWN
from megatron_ring.models.weights import load_hf
from megatron_ring.platform import distributed
from megatron_ring.rl import policy_loss, rank_balance, rl_batch
from megatron_ring.rl.actor import Actor
from megatron_ring.rl.responses import Response, Segment
from megatron_ring.rollout.embedded import EmbeddedEngine
from megatron_ring.train.engine import wrap_ddp
from tests.workers import start_model_worker

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17], [20, 21], [30, 31, 32, 33, 34], [40, 41, 42]]


def segments(groups) -> list[Segment]:
    segs = []
    for p, group in enumerate(groups):
        for s, c in enumerate(group):
            uid = p * len(group) + s
            r = Response(uid, p, "math", PROMPTS[p], c.tokens, c.logprobs, c.finish_reason, routing=c.routing)
            r.advantage = (-1.0) ** uid * (0.5 + 0.1 * uid)
            n = len(r.tokens)
            segs.append(Segment(r, 0, n - 3) if uid == 2 and n > 3 else Segment(r, 3, n) if uid == 5 and n > 3
                        else Segment(r))
    return segs


def main():
    a, layout, reader = start_model_worker(__doc__, bf16=0, max_tokens=0)
    model = build_model(reader.arch, layout)
    load_hf(model, reader)
    ddp = wrap_ddp(model, use_distributed_optimizer=False)
    engine = EmbeddedEngine(model, eos_id=1, batch_size=4, routing=True, bf16=bool(a.bf16))
    groups = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=12, temperature=1.0, seed=5),
                             keys=list(range(len(PROMPTS))))
    segs = segments(groups)
    mine = rank_balance.plan([segs], ps.get_data_parallel_world_size(), 2, per_rank=False,
                             max_tokens=a.max_tokens)[ps.get_data_parallel_rank()]
    batches = [rl_batch.build(mb, 1, layout.tp, per_response_norm=False, packed=a.max_tokens > 0) for mb in mine]
    replayed = [replace(b, replay=b.routing) for b in batches]

    result = {"known": 0, "exact": True, "lp_gap": {}, "metrics": {}}
    for name, bs in (("replay", replayed), ("natural", batches)):
        used = []
        logps = policy_loss.token_logprobs(ddp, bs, 1.0, routing_out=used)
        gap = 0.0
        for b, lp, u in zip(bs, logps, used):
            live = b.weights != 0
            if live.any():
                gap = max(gap, (lp - b.rollout_logp)[live].abs().max().item())
            if name == "replay":
                known = (b.routing != UNKNOWN).all(-1)
                result["known"] += int(known.sum())
                result["exact"] &= bool(torch.equal(u[known], b.routing[known]))
        result["lp_gap"][name] = gap
        if name == "natural":  # r2: the old pass's routing replayed gives the same experts and logprobs
            again = []
            relogp = policy_loss.token_logprobs(ddp, [replace(b, replay=u) for b, u in zip(bs, used)], 1.0,
                                                routing_out=again)
            result["r2_exact"] = all(torch.equal(x, y) for x, y in zip(used, again)) and all(
                torch.equal(x, y) for x, y in zip(logps, relogp))
            # The actor's r2 and r3: what each has the training forward replay.
            for mode, want in (("r2", used), ("r3", [b.routing for b in bs])):
                actor = Actor(SimpleNamespace(ddp=ddp, reference=None), SimpleNamespace(
                    router_replay=mode, ppo_epochs=2, reference_offload=False), 1.0)
                out = actor.with_old_and_ref(bs)
                result["r2_exact"] &= all(torch.equal(b.replay, w) for b, w in zip(out, want))
                result["r2_exact"] &= all(torch.equal(b.old_logp, lp) for b, lp in zip(out, logps)) or mode == "r3"
        ddp.zero_grad_buffer()
        result["metrics"][name] = policy_loss.forward_backward(ddp, bs, policy_loss.LossConfig(50))
        if name == "replay":  # a dummy micro-batch (a rank with less work) has nothing to compare
            ddp.zero_grad_buffer()
            dummy = rl_batch.from_rows([], 1, layout.tp, packed=a.max_tokens > 0)
            result["metrics"][name]["dummy_min"] = policy_loss.forward_backward(
                ddp, bs + [dummy], policy_loss.LossConfig(50))["routing_agreement_min"]
        ddp.zero_grad_buffer()  # masked IS in a band of +-1% around ratio 1
        tight = policy_loss.LossConfig(50, is_mask="sequence", is_mask_low=0.99, is_mask_high=1.01)
        result["metrics"][name]["tight_masked_frac"] = policy_loss.forward_backward(ddp, bs, tight)["is_masked_frac"]
    flags = torch.tensor([result["exact"], result["r2_exact"], result["known"]], dtype=torch.float64)
    dist.all_reduce(flags[:2], op=dist.ReduceOp.MIN)
    dist.all_reduce(flags[2:], op=dist.ReduceOp.SUM)
    gaps = torch.tensor([result["lp_gap"]["replay"], result["lp_gap"]["natural"]], dtype=torch.float64)
    dist.all_reduce(gaps, op=dist.ReduceOp.MAX)
    result.update(exact=bool(flags[0]), r2_exact=bool(flags[1]), known=int(flags[2]), lp_gap=dict(zip(("replay", "natural"), gaps.tolist())),
                  tokens=sum(len(c.tokens) for g in groups for c in g))
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    distributed.shutdown()


if __name__ == "__main__":
    main()
