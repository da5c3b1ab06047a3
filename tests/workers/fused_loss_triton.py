"""Worker: the Triton kernels of the fused C3PO loss under Triton's interpreter on CPU.
Run with TRITON_INTERPRET=1 in the environment (it must be set before the kernels are defined,
hence a separate process). Saves results per case for the test to compare with the reference."""

import argparse
import os

import torch

from megatron_ring.ops import c3po_loss_triton, fused_c3po_loss, logprob_entropy
from tests.workers.fused_loss_tp import KNOBS, make_case

# name -> (dtype, chunk_tokens, chunk_vocab, forward tiles per program)
CASES = {
    "fp32_chunked": (torch.float32, 16, 64, 4),    # 2 token x 5 vocab chunks, 3 forward splits
    "fp32_whole": (torch.float32, None, None, 64),  # the GPU defaults: one chunk, one split
    "bf16": (torch.bfloat16, None, None, 64),
}


def run_case(dtype, chunk_tokens, chunk_vocab, tiles) -> dict:
    c3po_loss_triton._FORWARD_TILES = tiles
    case = make_case(dtype=dtype)
    hidden = case.pop("hidden").requires_grad_(True)
    weight = case.pop("weight").requires_grad_(True)
    args = (case["targets"], case["advantages"], case["loss_mask"], case["old_logp"], case["ref_logp"])
    out = fused_c3po_loss(hidden, weight, *args, true_vocab_size=301, chunk_tokens=chunk_tokens,
                          chunk_vocab=chunk_vocab, impl="triton", **KNOBS)
    out.loss.backward()
    with torch.no_grad():
        fwd_logp, fwd_entropy = logprob_entropy(hidden, weight, case["targets"], temperature=KNOBS["temperature"],
                                                true_vocab_size=301, impl="triton")
    return dict(loss=out.loss.detach(), logp=out.logp, entropy=out.entropy, ratio=out.ratio, kl=out.kl,
                clip_low=out.clip_low_frac, clip_high=out.clip_high_frac, dh=hidden.grad.float(),
                dw=weight.grad.float(), fwd_logp=fwd_logp, fwd_entropy=fwd_entropy)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    torch.save({name: run_case(*spec) for name, spec in CASES.items()}, a.out)


if __name__ == "__main__":
    main()
