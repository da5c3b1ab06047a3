"""The RL loss: the C3PO objective's gradient on a case small enough to compute by hand, and the
whole path (Megatron forward to hidden states, fused loss kernel, the schedule's per-token
scaling, DDP) against plain autograd through an independent forward of the same HF weights, at
one process and at TP2/EP2 and TP1/EP2 (2 gloo processes)."""

import math

import pytest
import torch

from megatron_ring.models.hf_checkpoint import HFReader
from megatron_ring.ops.c3po_objective import C3POCoefficients, c3po_objective
from tests.conftest import run_workers
from tests.hf_reference import hf_forward
from tests.workers.rl_loss import CFG, PHI, fixed_segments, offset


def test_c3po_gradient_by_hand():
    """Four tokens, Phi = 10: d loss / d logp_t = -(w_t / Phi) * dObj_t/dlogp_t, with
    Obj = min(r A, clip(r) A) and r = exp(logp - old). By hand:
      t0: r = 1,      A = 2  -> unclipped: -(1/10) * 2 * 1      = -0.2
      t1: r = e^0.5,  A = 1  -> r > 1.2, clipped (A > 0): 0
      t2: r = e^-0.5, A = 1  -> r < 0.8 but A > 0 takes r A:   -(1/10) * e^-0.5
      t3: mask 0             -> 0
    The divisor is Phi, not the 3 tokens present."""
    logp = torch.tensor([-1.0, -1.0, -1.0, -1.0], requires_grad=True)
    old = torch.tensor([-1.0, -1.5, -0.5, -1.0])
    adv = torch.tensor([2.0, 1.0, 1.0, 5.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    out = c3po_objective(logp, torch.zeros(4), adv, mask, old, None, C3POCoefficients(10.0, 0.2, 0.2))
    out.loss.backward()
    expected = torch.tensor([-0.2, 0.0, -math.exp(-0.5) / 10, 0.0])
    assert torch.allclose(logp.grad, expected, atol=1e-7)
    assert out.loss.item() == pytest.approx(-(2 * 1 + 1.2 * 1 + math.exp(-0.5)) / 10, rel=1e-6)
    assert out.clip_high_frac.item() == pytest.approx(1 / 3)


def naive_loss(sd, config, segs):
    """-(1/Phi) sum over segment tokens of [min(rA, clip(r)A) - beta*k3 + c*H], one sequence
    at a time through the plain-PyTorch forward (no padding, no batching, no Megatron)."""
    total = 0.0
    for seg in segs:
        r = seg.response
        ids = torch.tensor([r.prompt_ids + r.tokens[:seg.end]])
        logits = hf_forward(sd, config, ids, grad=True)[0]
        labels = torch.tensor(r.prompt_ids + r.tokens[:seg.end] + [1])[1:][None]
        logp_all = torch.log_softmax(logits.float(), -1)
        logp = logp_all.gather(-1, labels[0][:, None]).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
        pos = torch.arange(labels.shape[-1])[None]
        old = logp.detach() + offset(labels, pos, 0.4, 0.0)[0]
        ref = logp.detach() + offset(labels, pos, 0.5, 1.0)[0]
        p = len(r.prompt_ids)
        sl = slice(p + seg.start - 1, p + seg.end - 1)
        ratio = torch.exp(logp[sl] - old[sl])
        clipped = ratio.clamp(1 - CFG["eps_low"], 1 + CFG["eps_high"])
        surr = torch.minimum(ratio * r.advantage, clipped * r.advantage)
        d = ref[sl] - logp[sl]
        kl = torch.exp(d) - d - 1
        total = total + (surr - CFG["beta"] * kl + CFG["entropy_coef"] * ent[sl]).sum()
    return -total / PHI


@pytest.fixture(scope="module")
def naive():
    """naive(hf_dir) -> (loss, HF-named gradients) of the plain forward, computed once per checkpoint."""
    done = {}

    def of(hf_dir):
        if hf_dir not in done:
            reader = HFReader(hf_dir)
            sd = {n: reader.read(n).float().requires_grad_(True) for n in reader.file_of}
            loss = naive_loss(sd, reader.config, fixed_segments(reader.arch.vocab_size))
            loss.backward()
            done[hf_dir] = loss.item(), {n: t.grad for n, t in sd.items()}
        return done[hf_dir]
    return of


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


# `make test-fast` runs tp2ep2 (TP, SP, EP and two data-parallel micro-batch splits against the
# plain forward); `make test` every case.
# Packed: token-sized micro-batches of at most 40 tokens, several segments in one row (a
# block-diagonal mask on CPU), must give the same loss and gradients as one segment per row.
@pytest.mark.parametrize("nproc,tp,ep,mb,hf,max_tokens", [
    pytest.param(1, 1, 1, 2, "tiny_hf", 0, marks=pytest.mark.slow),
    pytest.param(1, 1, 1, 4, "tiny_hf", 0, marks=pytest.mark.slow),
    (1, 1, 1, 1, "tiny_hf", 40),
    (2, 2, 2, 1, "tiny_hf", 0),
    pytest.param(2, 2, 2, 1, "tiny_hf", 40, marks=pytest.mark.slow),
    pytest.param(2, 1, 2, 2, "tiny_hf", 0, marks=pytest.mark.slow),
    pytest.param(2, 2, 1, 2, "tiny_hf_normhead", 0, marks=pytest.mark.slow)],
    ids=["1proc-mb2", "1proc-mb4", "1proc-packed", "tp2ep2", "tp2ep2-packed", "tp1ep2", "tp2-norm_head"])
def test_rl_loss_matches_plain_autograd(request, naive, tmp_path, nproc, tp, ep, mb, hf, max_tokens):
    """norm_head reaches the fused kernel through output_weight(): its case checks that path."""
    hf_dir = request.getfixturevalue(hf)
    out = tmp_path / "rl.pt"
    run_workers("rl_loss", nproc, "--hf", hf_dir, "--tp", tp, "--ep", ep, "--micro-batch", mb,
                "--max-tokens", max_tokens, "--out", out)
    got = torch.load(out)
    loss, grads = naive(hf_dir)
    segs = fixed_segments(1000)
    assert got["out"]["tokens_in_loss"] == sum(s.n_tokens for s in segs)
    assert got["out"]["loss"] == pytest.approx(loss, rel=1e-4)
    assert 0 < got["out"]["clip_frac"] < 1 and got["out"]["kl"] > 0  # both branches exercised
    assert set(got["grads"]) == set(grads)
    worst = max(grads, key=lambda k: _rel(got["grads"][k], grads[k]))
    assert _rel(got["grads"][worst], grads[worst]) < 1e-4, worst
    assert got["grads"]["lm_head.weight"].abs().sum() > 0  # the output weight learns through the fused kernel
