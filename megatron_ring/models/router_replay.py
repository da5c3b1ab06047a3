"""Routing replay (R3/R2) through Megatron-Core's router replay hook: every TopKRouter of the
model gets a LayerRouting in its `router_replay` slot, which Megatron calls for each top-k
(megatron-core 0.16.1 moe_utils.topk_routing_with_score_function, unfused path).

Each forward keeps, per MoE layer, the router's own top-k (`natural`) and the experts the layer
actually used. With a target set, a token's experts are the target's and its weights the
router's scores gathered at them, as Megatron's own REPLAY_FORWARD does; a token whose target
row is UNKNOWN (prompt tokens an engine did not report, the last sampled token, padding) is
routed by the router itself. Unlike Megatron's process-global RouterReplay list, the state is
per model, so the policy and the reference replay independently. Recomputation in backward
(train.recompute) re-runs the router of the same micro-batch with the same target, so it picks
the same experts: that holds for Megatron's no-pipelining schedule (forward then backward of one
micro-batch), the only one this project runs.

Routing of a sequence is uint8 [tokens, layers, top_k] (expert ids, UNKNOWN = 255): at 32K
tokens x 28 layers x top-6 that is 5.4 MB a response, the smallest type that holds Ling's 64
experts."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

UNKNOWN = 255
DTYPE = np.uint8


class LayerRouting:
    """One MoE layer's slot: the target to replay and what the last forward chose."""

    def __init__(self):
        self.target: torch.Tensor | None = None  # [router tokens, k] int64, UNKNOWN rows: natural
        self.natural: torch.Tensor | None = None  # the router's own top-k of the last forward
        self.used: torch.Tensor | None = None  # the experts the last forward used

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        probs, natural = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        self.natural = natural.detach()
        if self.target is None:
            self.used = self.natural
            return probs, natural
        target = self.target.to(scores.device)
        if target.shape != natural.shape:
            raise ValueError(f"routing replay: target {tuple(target.shape)} for {tuple(natural.shape)} routed tokens")
        known = (target != UNKNOWN).all(-1, keepdim=True)
        idx = torch.where(known, target, natural)
        self.used = idx
        return scores.gather(1, idx), idx  # the replayed experts' scores, as Megatron's replay


class ModelRouting:
    """The LayerRouting of every MoE layer of one model, in layer order, and the mapping between
    a batch's [b, s, layers, k] routing and each router's tokens ([s (this rank's sequence
    shard under sequence parallelism) x b] in Megatron's [s, b] order)."""

    def __init__(self, model):
        from megatron.core.transformer.moe.router import TopKRouter

        if model.config.num_moe_experts >= UNKNOWN:
            raise ValueError(f"routing replay stores expert ids as uint8 with {UNKNOWN} for unknown: "
                             f"{model.config.num_moe_experts} experts do not fit")
        self.sequence_parallel = model.config.sequence_parallel
        self.topk = model.config.moe_router_topk
        self.layers = []
        for m in model.modules():
            if isinstance(m, TopKRouter):
                if m.config.moe_router_fusion:
                    raise ValueError("routing replay needs the unfused router (moe_router_fusion=False)")
                m.router_replay = LayerRouting()
                self.layers.append(m.router_replay)

    def _shard(self, s: int) -> slice:
        """The sequence positions this rank's routers see."""
        if not self.sequence_parallel:
            return slice(0, s)
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        return slice(rank * s // tp, (rank + 1) * s // tp)

    def set_target(self, routing: torch.Tensor | None) -> None:
        """routing [b, s, layers, k] (UNKNOWN where the router decides), None: the routers' own."""
        if routing is None:
            for layer in self.layers:
                layer.target = None
            return
        b, s, n_layers, k = routing.shape
        if n_layers != len(self.layers) or k != self.topk:
            raise ValueError(f"routing replay: routing has {n_layers} layers x top-{k}, the model "
                             f"{len(self.layers)} MoE layers x top-{self.topk}")
        local = routing[:, self._shard(s)].long()
        for i, layer in enumerate(self.layers):
            layer.target = local[:, :, i].transpose(0, 1).reshape(-1, k)

    def _of(self, attr: str, b: int) -> torch.Tensor:
        """[b, local s, layers, k] of the last forward's `natural` or `used` experts."""
        per_layer = [getattr(layer, attr).view(-1, b, self.topk).transpose(0, 1) for layer in self.layers]
        return torch.stack(per_layer, dim=2)

    def chosen(self, b: int, gather: bool = False) -> torch.Tensor:
        """The experts the last forward used, uint8 [b, s, layers, k]; gather: the whole
        sequence on every TP rank (sequence parallelism shards it)."""
        used = self._of("used", b).to(torch.uint8)
        if gather and self.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
            parts = [torch.empty_like(used) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(parts, used.contiguous(), group=ps.get_tensor_model_parallel_group())
            used = torch.cat(parts, dim=1)
        return used

    def agreement(self, rollout: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Counts over (token, layer) where `mask` [b, s] is set and the rollout's routing is
        known: [pairs, used == rollout, natural == rollout], top-k compared as sets, summed over
        the TP group's sequence shards."""
        b, s = mask.shape
        shard = self._shard(s)
        want = rollout[:, shard].long().sort(-1).values
        ok = mask[:, shard].bool()[:, :, None] & (want != UNKNOWN).all(-1)
        out = torch.stack([ok.sum()] + [((self._of(a, b).sort(-1).values == want).all(-1) & ok).sum()
                                        for a in ("used", "natural")]).double()
        if self.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(out, group=ps.get_tensor_model_parallel_group())
        return out


def routing_of(model) -> ModelRouting:
    """The model's routing slots (installed once, at build)."""
    from megatron_ring.models.lm_head import unwrap

    return unwrap(model).routing
