"""Worker: LingModel.hidden_states against forward(): the logits forward() returns must equal
hidden_states() @ output_weight().T (plain causal rows and a packed row with a document mask),
and a norm_head model must be built as the plain one is (same parameters, same RNG draws, one
output weight Parameter). Rank 0 saves the measurements as JSON."""

import json

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megatron_ring.models.packed_docs import document_attention_mask
from megatron_ring.models.builder import NormHeadLinear, build_model
from megatron_ring.models.weights import load_hf
from megatron_ring.platform import distributed
from tests.workers import start_model_worker


def _seeded_build(arch, layout, seed=11):
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    model = build_model(arch, layout)
    return model, torch.get_rng_state()


def main():
    a, layout, reader = start_model_worker(__doc__)
    arch = reader.arch

    plain, rng_plain = _seeded_build(arch.replace(norm_head=False), layout)
    normed, rng_normed = _seeded_build(arch.replace(norm_head=True), layout)
    a_sd, b_sd = plain.state_dict(), normed.state_dict()
    same_init = list(a_sd) == list(b_sd) and all(
        torch.equal(a_sd[k], b_sd[k]) for k in a_sd if torch.is_tensor(a_sd[k]))
    out_params = [n for n, _ in normed.named_parameters() if n.startswith("output_layer.")]
    del plain, normed

    model = build_model(arch, layout)
    load_hf(model, reader)
    model.eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, arch.vocab_size, (2, 48), generator=g)
    pos = torch.arange(48).expand(2, 48)
    doc_ids = torch.tensor([0] * 20 + [1] * 28)[None].expand(2, 48)
    packed_pos = torch.cat([torch.arange(20), torch.arange(28)]).expand(2, 48)
    errs, scale = {}, 0.0
    with torch.no_grad():
        for name, (p_ids, mask) in {"causal": (pos, None),
                                    "packed": (packed_pos, document_attention_mask(doc_ids))}.items():
            logits = model(ids, p_ids, mask)  # [b, s, V/tp]
            h = model.hidden_states(ids, p_ids, mask)  # [s(/tp), b, h]
            if model.config.sequence_parallel:
                h = tensor_parallel.gather_from_sequence_parallel_region(h)
            mine = torch.matmul(h, model.output_weight().t()).transpose(0, 1)
            errs[name] = (logits - mine).abs().max().item()
            scale = max(scale, logits.abs().max().item())
        shape = list(model.hidden_states(ids, pos, None).shape)
    if dist.get_rank() == 0:
        json.dump({"max_abs_diff": errs, "logit_scale": scale, "hidden_shape": shape,
                   "same_init_with_norm_head": same_init, "rng_same": torch.equal(rng_plain, rng_normed),
                   "norm_head_layer": type(model.output_layer) is NormHeadLinear,
                   "norm_head_output_params": out_params,
                   "tp": ps.get_tensor_model_parallel_world_size()}, open(a.out, "w"))
    distributed.shutdown()


if __name__ == "__main__":
    main()
