"""Worker: two documents packed in one row (positions restarting, block-diagonal mask) must give
the second document the logits it gets alone; also the vocab-parallel entropy of the packed row
(ops.logprob_entropy from its hidden states) against a direct softmax of its gathered logits.
Saves the differences as JSON (rank 0)."""

import json

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_ring.models.packed_docs import document_attention_mask
from megatron_ring.models.builder import build_model
from megatron_ring.models.weights import load_hf
from megatron_ring.ops import full_logits, logprob_entropy
from megatron_ring.platform import distributed
from tests.workers import start_model_worker


def main():
    a, layout, reader = start_model_worker(__doc__)
    arch = reader.arch
    model = build_model(arch, layout)
    load_hf(model, reader)
    model.eval()
    g = torch.Generator().manual_seed(3)
    la, lb, pad = 19, 27, 2  # row length 48: divisible by TP for sequence parallelism
    doc_a, doc_b = torch.randint(2, arch.vocab_size, (la,), generator=g), torch.randint(2, arch.vocab_size, (lb,), generator=g)
    row = torch.cat([doc_a, doc_b, torch.ones(pad, dtype=torch.long)])[None]
    doc_ids = torch.tensor([0] * la + [1] * lb + [-1] * pad)[None]
    positions = torch.cat([torch.arange(la), torch.arange(lb), torch.zeros(pad, dtype=torch.long)])[None]
    alone_ids = torch.cat([doc_b, torch.ones(48 - lb, dtype=torch.long)])[None]
    with torch.no_grad():
        packed = model(row, positions, document_attention_mask(doc_ids))
        leaky = model(row, torch.arange(48)[None], None)  # plain causal: B sees A
        alone = model(alone_ids, torch.arange(48)[None], None)
        tp = ps.get_tensor_model_parallel_group()
        full = {k: full_logits(v, arch.vocab_size, tp)[0]
                for k, v in (("packed", packed), ("leaky", leaky), ("alone", alone))}
        hidden = model.hidden_states(row, positions, document_attention_mask(doc_ids))  # [s(/tp), 1, h]
        _, entropy = logprob_entropy(hidden.reshape(-1, hidden.shape[-1]), model.output_weight(),
                                     torch.zeros(48, dtype=torch.long), tp_group=tp if layout.tp > 1 else None,
                                     true_vocab_size=arch.vocab_size, sequence_parallel=model.config.sequence_parallel)
    direct = torch.distributions.Categorical(logits=full["packed"].double()).entropy()
    if dist.get_rank() == 0:
        b = slice(la, la + lb)
        json.dump({
            "packed_vs_alone": (full["packed"][b] - full["alone"][:lb]).abs().max().item(),
            "leaky_vs_alone": (full["leaky"][b] - full["alone"][:lb]).abs().max().item(),
            "doc_a_packed_vs_leaky": (full["packed"][:la] - full["leaky"][:la]).abs().max().item(),
            "entropy_err": (entropy.double() - direct).abs().max().item(),
            "entropy_mean": direct.mean().item(),
        }, open(a.out, "w"))
    distributed.shutdown()


if __name__ == "__main__":
    main()
