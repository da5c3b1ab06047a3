"""Worker: load an HF checkpoint at a TP/EP layout; save loss, full logits and HF-named grads."""

import argparse

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_ring.models.builder import build_model
from megatron_ring.models.hf_checkpoint import HFReader
from megatron_ring.models.weights import hf_state_dict, load_hf
from megatron_ring.ops import full_logits
from megatron_ring.platform import distributed
from megatron_ring.train import checkpoint
from megatron_ring.train.engine import Batch, forward_backward, wrap_ddp


def fixed_batch(vocab: int, b: int = 4, s: int = 32):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (b, s + 1), generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.2).float()
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), mask


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hf", required=True, help="HF checkpoint (weights, unless --megatron-ckpt)")
    p.add_argument("--megatron-ckpt", help="load weights from this Megatron checkpoint instead")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--aux", type=float, default=1e-2)
    p.add_argument("--zloss", type=float, default=1e-3)
    a = p.parse_args()

    layout = distributed.init(a.tp, a.ep)
    reader = HFReader(a.hf)
    arch = reader.arch
    model = build_model(arch, layout.validate(arch), aux_loss_coeff=a.aux, z_loss_coeff=a.zloss)
    if a.megatron_ckpt:
        checkpoint.load(checkpoint.latest(a.megatron_ckpt), model)
    else:
        load_hf(model, reader)
    ddp = wrap_ddp(model, use_distributed_optimizer=False)

    ids, labels, mask = fixed_batch(arch.vocab_size)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = slice(dp_rank * len(ids) // dp, (dp_rank + 1) * len(ids) // dp)
    batch = Batch(ids[mine], labels[mine], mask[mine])

    model.eval()
    with torch.no_grad():
        logits = full_logits(model(batch.input_ids, batch.positions(), None), arch.vocab_size,
                             ps.get_tensor_model_parallel_group())
    parts = [torch.empty_like(logits) for _ in range(dp)]
    dist.all_gather(parts, logits.contiguous(), group=ps.get_data_parallel_group())
    model.train()

    # One row per micro-batch: every layout then runs the same set of micro-batches (the
    # load-balancing loss is a per-micro-batch statistic), and gradient accumulation over
    # several micro-batches per rank is part of what is compared.
    micro = [Batch(batch.input_ids[i:i + 1], batch.labels[i:i + 1], batch.loss_mask[i:i + 1])
             for i in range(len(batch.input_ids))]
    out = forward_backward(ddp, micro)
    grads = hf_state_dict(model, value=lambda n, p: p.main_grad)
    if dist.get_rank() == 0:
        torch.save({"loss": out["loss"], "tokens": out["tokens"], "logits": torch.cat(parts),
                    "grads": grads}, a.out)
    distributed.shutdown()


if __name__ == "__main__":
    main()
