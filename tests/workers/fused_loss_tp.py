"""Worker: the fused C3PO loss at TP=2 over gloo (plain torch.distributed, no Megatron state),
with and without sequence parallelism, on odd vocabularies; rank 0 saves losses, per-token
metrics and the full (gathered) gradients for the test to compare with a one-process reference.

make_case() is also the input generator of the single-process tests and the Triton worker."""

import argparse

import torch
import torch.distributed as dist

from megatron_ring.ops import fused_c3po_loss

KNOBS = dict(eps_low=0.2, eps_high=0.25, beta=0.05, entropy_coef=0.01, temperature=0.8, normalizer=40.0)
# name -> (true vocabulary, padded rows, sequence parallel). "padding_shard": at TP=2 the second
# rank holds only padding rows.
TP_CASES = {"odd": (301, 320, False), "odd_sp": (301, 320, True), "padding_shard": (150, 320, False)}


def make_case(seed: int = 0, tokens: int = 24, hidden: int = 32, true_vocab: int = 301,
              padded_vocab: int = 320, dtype=torch.float32):
    """Random inputs whose ratios straddle both clip bounds and whose last rows are masked."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(padded_vocab, hidden, generator=g) * 0.3
    w[true_vocab:] = 50.0  # padding rows would dominate the softmax if they were not masked
    targets = torch.randint(0, true_vocab, (tokens,), generator=g)
    with torch.no_grad():
        z = (h.double() @ w[:true_vocab].double().T) / KNOBS["temperature"]
        logp = z.log_softmax(-1).gather(1, targets[:, None])[:, 0].float()
    old = logp + 0.4 * torch.randn(tokens, generator=g)
    ref = logp + 0.3 * torch.randn(tokens, generator=g)
    adv = torch.randn(tokens, generator=g)
    mask = torch.ones(tokens)
    mask[-3:] = 0.0
    mask[1] = 0.0
    return dict(hidden=h.to(dtype), weight=w.to(dtype), targets=targets, advantages=adv,
                loss_mask=mask, old_logp=old, ref_logp=ref)


def _gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def run_case(true_vocab: int, padded: int, sp: bool, group) -> dict:
    case = make_case(true_vocab=true_vocab, padded_vocab=padded)
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    local_v, local_t = padded // tp, case["hidden"].shape[0] // tp
    hidden = case["hidden"][rank * local_t:(rank + 1) * local_t] if sp else case["hidden"]
    hidden = hidden.clone().requires_grad_(True)
    weight = case["weight"][rank * local_v:(rank + 1) * local_v].clone().requires_grad_(True)
    out = fused_c3po_loss(hidden, weight, case["targets"], case["advantages"], case["loss_mask"],
                          case["old_logp"], case["ref_logp"], tp_group=group, true_vocab_size=true_vocab,
                          sequence_parallel=sp, chunk_tokens=7, chunk_vocab=64, impl="torch", **KNOBS)
    out.loss.backward()
    dh = _gather_rows(hidden.grad, group) if sp else hidden.grad
    return dict(loss=out.loss.detach(), logp=out.logp, entropy=out.entropy, ratio=out.ratio, kl=out.kl,
                clip_low=out.clip_low_frac, clip_high=out.clip_high_frac, dh=dh,
                dw=_gather_rows(weight.grad, group),
                # every rank must see the same per-token values, or their gradients disagree
                logp_spread=(_gather_rows(out.logp[None], group) - out.logp).abs().max())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dist.init_process_group("gloo")
    group = dist.new_group(list(range(dist.get_world_size())))
    results = {name: run_case(*spec, group) for name, spec in TP_CASES.items()}
    if dist.get_rank() == 0:
        torch.save(results, a.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
