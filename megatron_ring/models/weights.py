"""Move weights between a live (TP/EP-sharded) Megatron model and HF checkpoints."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_ring.models import hf_convert as conv
from megatron_ring.models.hf_checkpoint import CheckpointError, HFReader, HFWriter


def _ranks():
    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size())


def load_hf(model, reader: HFReader) -> None:
    """Fill this rank's shard of `model` from an HF checkpoint (validated first)."""
    arch = model.arch
    if reader.arch != arch:
        diff = {k: (getattr(reader.arch, k), getattr(arch, k)) for k in arch.__dataclass_fields__
                if getattr(reader.arch, k) != getattr(arch, k)}
        raise CheckpointError(f"{reader.path}/config.json differs from the model: "
                              + ", ".join(f"{k}={a!r} (model: {b!r})" for k, (a, b) in diff.items()))
    reader.validate(arch)
    tp_rank, tp, ep_rank, ep = _ranks()
    local_experts = arch.num_experts // ep
    padded_vocab = model.vocab_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            full_name = conv.with_global_expert(name, ep_rank, local_experts)
            full = conv.from_hf(full_name, reader.read, arch, padded_vocab)
            local = conv.shard(full, conv.sharding_of(name), tp_rank, tp)
            if local.shape != param.shape:
                raise CheckpointError(f"{reader.path}: {full_name} gives a shard of shape {list(local.shape)} "
                                      f"for parameter {name} of shape {list(param.shape)}")
            param.copy_(local)


def _all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def gather_full(model, value: Callable[[str, torch.nn.Parameter], torch.Tensor] = lambda n, p: p.data,
                first_replica: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (full Megatron name, unsharded tensor) for every parameter; collective on all ranks.

    `value` picks what to gather (the weights by default; gradients for the equivalence tests).
    first_replica: only the ranks holding data-parallel replica 0 gather (dense parameters on
    data-parallel rank 0, experts on expert-data-parallel rank 0; a TP or EP group shares its
    replica index, so each collective is whole): a single sender (global rank 0) gets every
    tensor, and the other replicas do no redundant gathering. Ranks yield only what they gathered.
    """
    tp_rank, tp, ep_rank, ep = _ranks()
    local_experts = model.arch.num_experts // ep
    dense = not first_replica or ps.get_data_parallel_rank() == 0
    experts = not first_replica or ps.get_expert_data_parallel_rank() == 0
    for name, param in model.named_parameters():
        sharding = conv.sharding_of(name)
        if not (experts if sharding.expert else dense):
            continue
        t = value(name, param).detach()
        if sharding.expert:
            pieces = _all_gather(t, ps.get_expert_model_parallel_group()) if ep > 1 else [t]
            for r, piece in enumerate(pieces):
                yield conv.with_global_expert(name, r, local_experts), piece
        else:
            pieces = _all_gather(t, ps.get_tensor_model_parallel_group()) if sharding.tp_dim is not None and tp > 1 else [t]
            yield conv.canonical_name(name), conv.unshard(pieces, sharding)


def hf_state_dict(model, value=lambda n, p: p.data) -> dict[str, torch.Tensor]:
    """The whole model (or its gradients) in HF names; every rank gets it. For small models."""
    out = {}
    for name, full in gather_full(model, value):
        out.update(conv.to_hf(name, full, model.arch))
    return out


def export_hf(model, path, dtype: torch.dtype = torch.bfloat16, source=None) -> None:
    """Write the model as an HF checkpoint directory from global rank 0 (collective), with the
    tokenizer, generation config and modeling code of `source` (the HF directory the weights
    came from) when one is known."""
    writer = HFWriter(path, model.arch, dtype, source=source) if dist.get_rank() == 0 else None
    for name, full in gather_full(model):
        if writer is not None:
            for hf_name, t in conv.to_hf(name, full, model.arch).items():
                writer.add(hf_name, t)
    if writer is not None:
        writer.close()
    dist.barrier()
