"""Importance-sampling corrections of the C3PO objective against the rollout engine's logprobs:
truncated weights (tis_cap), token masking and sequence masking (is_mask), alone and combined.

A nine-token case in three sequences (plus a row without loss) is computed by hand, one token at
a time in plain Python, and compared with c3po_objective, then with fused_c3po_loss (torch
backend) and naive_c3po_loss on hidden states whose logprobs are set up the same way."""

import math

import pytest
import torch

from megatron_ring.ops import fused_c3po_loss
from megatron_ring.ops.c3po_loss_naive import naive_c3po_loss
from megatron_ring.ops.c3po_objective import C3POCoefficients, c3po_objective

PHI, EPS_LOW, EPS_HIGH, BETA, ENT = 10.0, 0.2, 0.2, 0.1, 0.01
LOW, HIGH = 0.5, 2.0  # the band; log: [-0.693, 0.693]
NAN, INF = float("nan"), float("inf")

# Sequences: tokens 0-2 (id 7), 3-6 (id 3; token 6 carries no loss), 7-8 (id 11).
SEQ = [7, 7, 7, 3, 3, 3, 3, 11, 11]
W = [1.0, 1.0, 0.5, 1.0, 2.0, 1.0, 0.0, 1.0, 1.0]  # loss_mask: per-token weights, 0 on token 6
LOGP = [-2.0, -1.5, -3.0, -2.2, -1.3, -1.7, -2.0, -2.5, -1.9]
# log(pi / pi_old): 0.3 and -0.4 lie beyond the clip range (tokens 1 and 3 take the clipped branch)
LOG_R = [0.0, 0.3, -0.1, -0.4, 0.1, 0.05, 0.0, 0.25, -0.3]
# log rho = old - rollout, per token. Token masking drops tokens 1 (e^1.0 = 2.72) and 8 (e^0.9 =
# 2.46) above the band, 3 (e^-1.0 = 0.37) and 5 (e^-0.8 = 0.45) below it. Sequence means: id 7 -> 1.3/3 (e^0.43 = 1.54, kept), id 3 -> -2.3/3
# (e^-0.77 = 0.46 < 0.5: tokens 3-5 dropped), id 11 -> 0.75 (e^0.75 = 2.12 > 2: tokens 7-8 dropped).
LOG_RHO = [0.0, 1.0, 0.3, -1.0, -0.5, -0.8, 0.0, 0.6, 0.9]
ADV = [1.0, 1.0, -1.0, -1.0, 0.5, -2.0, NAN, 1.5, 1.0]
REF_OFFSET = [0.1, -0.2, 0.3, 0.15, -0.1, 0.2, 0.0, 0.1, -0.3]
ENTROPY = [1.0, 2.0, 0.5, 1.5, 0.7, 1.2, 3.0, 0.9, 1.1]
TOKEN_DROPS, SEQ_DROPS = [1, 3, 5, 8], [3, 4, 5, 7, 8]


def tensors(logp=LOGP):
    """The case as fp32 tensors; the row without loss holds garbage old/rollout logprobs."""
    logp = torch.tensor(logp)
    old = logp - torch.tensor(LOG_R)
    rollout = old - torch.tensor(LOG_RHO)
    old[6], rollout[6] = -INF, NAN
    return dict(logp=logp, old=old, rollout=rollout, adv=torch.tensor(ADV), w=torch.tensor(W),
                ref=logp + torch.tensor(REF_OFFSET), entropy=torch.tensor(ENTROPY),
                seq=torch.tensor(SEQ, dtype=torch.int64))


def by_hand(c, *, on_policy=False, tis_cap=0.0, mode="off", low=LOW, high=HIGH):
    """-(1/Phi) sum_t w_t * (min(r A, clip(r) A) - beta*k3_t + ent*H_t), token by token, with
    w_t = loss_mask_t * min(rho_t, cap) (TIS), then 0 if the token (or its sequence's geometric
    mean of rho) is outside [low, high]. Returns the loss, d/dlogp, d/dentropy, dropped tokens."""
    logp, old, rollout, adv, w, ref, ent, seq = (c[k].tolist() for k in
                                                 ("logp", "old", "rollout", "adv", "w", "ref", "entropy", "seq"))
    n = len(logp)
    live = [w[t] != 0 for t in range(n)]
    behaviour = logp if on_policy else old
    log_rho = [behaviour[t] - rollout[t] if live[t] else 0.0 for t in range(n)]
    weight = list(w)
    if tis_cap > 0:
        weight = [weight[t] * min(math.exp(log_rho[t]), tis_cap) for t in range(n)]
    dropped = [False] * n
    if mode == "token":
        dropped = [live[t] and not low <= math.exp(log_rho[t]) <= high for t in range(n)]
    if mode == "sequence":
        for s in set(seq):
            members = [t for t in range(n) if seq[t] == s and live[t]]
            if members:
                geo = math.exp(sum(log_rho[t] for t in members) / len(members))
                for t in members:
                    dropped[t] = not low <= geo <= high
    weight = [0.0 if dropped[t] else weight[t] for t in range(n)]
    loss, d_logp, d_ent = 0.0, [0.0] * n, [0.0] * n
    for t in range(n):
        if not live[t]:
            continue
        r = 1.0 if on_policy else math.exp(logp[t] - old[t])
        clipped = min(max(r, 1 - EPS_LOW), 1 + EPS_HIGH)
        if r * adv[t] <= clipped * adv[t]:  # the unclipped branch: d(r A)/dlogp = r A
            surrogate, d_surrogate = r * adv[t], r * adv[t]
        else:  # the clipped branch is constant in logp
            surrogate, d_surrogate = clipped * adv[t], 0.0
        d = ref[t] - logp[t]
        k3, d_k3 = math.exp(d) - d - 1, 1 - math.exp(d)
        loss -= weight[t] * (surrogate - BETA * k3 + ENT * ent[t]) / PHI
        d_logp[t] = -weight[t] * (d_surrogate - BETA * d_k3) / PHI
        d_ent[t] = -weight[t] * ENT / PHI
    return loss, torch.tensor(d_logp), torch.tensor(d_ent), [t for t in range(n) if dropped[t]]


def run_objective(c, *, on_policy=False, **kw):
    logp = c["logp"].clone().requires_grad_(True)
    entropy = c["entropy"].clone().requires_grad_(True)
    out = c3po_objective(logp, entropy, c["adv"], c["w"], None if on_policy else c["old"], c["ref"],
                         C3POCoefficients(PHI, EPS_LOW, EPS_HIGH, BETA, ENT), c["rollout"], **kw)
    out.loss.backward()
    return out, logp.grad, entropy.grad


def check_against_hand(c, *, on_policy=False, tis_cap=0.0, mode="off", **kw):
    out, d_logp, d_ent = run_objective(c, on_policy=on_policy, tis_cap=tis_cap, is_mask=mode,
                                       is_mask_low=LOW, is_mask_high=HIGH, seq_ids=c["seq"], **kw)
    loss, want_logp, want_ent, dropped = by_hand(c, on_policy=on_policy, tis_cap=tis_cap, mode=mode)
    assert out.loss.item() == pytest.approx(loss, rel=1e-6, abs=1e-9)
    torch.testing.assert_close(d_logp, want_logp, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(d_ent, want_ent, rtol=1e-5, atol=1e-8)
    assert out.is_masked.tolist() == [1.0 if t in dropped else 0.0 for t in range(len(SEQ))]
    assert out.is_masked.dtype == torch.float32 and not out.is_masked.requires_grad
    # a dropped token has no loss and exactly no gradient, through any term
    for t in dropped:
        assert d_logp[t] == 0 and d_ent[t] == 0, t
    assert d_logp[6] == 0 and out.is_masked[6] == 0  # the row without loss, garbage in it
    assert torch.isfinite(out.loss)
    return out, d_logp, dropped


def test_the_case_drops_what_it_was_built_to_drop():
    c = tensors()
    assert by_hand(c, mode="token")[3] == TOKEN_DROPS  # two above the band, two below
    assert by_hand(c, mode="sequence")[3] == SEQ_DROPS  # one sequence below, one above, one kept
    # token masking keeps tokens 4 and 7, whose sequences go as a whole; sequence masking keeps
    # token 1, whose sequence is inside the band on average
    assert set(SEQ_DROPS) - set(TOKEN_DROPS) == {4, 7} and set(TOKEN_DROPS) - set(SEQ_DROPS) == {1}


@pytest.mark.parametrize("on_policy", [False, True], ids=["old_logp", "on_policy"])
def test_off_matches_hand(on_policy):
    check_against_hand(tensors(), on_policy=on_policy)
    check_against_hand(tensors(), on_policy=on_policy, tis_cap=1.5)


@pytest.mark.parametrize("on_policy", [False, True], ids=["old_logp", "on_policy"])
@pytest.mark.parametrize("mode", ["token", "sequence"])
@pytest.mark.parametrize("tis_cap", [0.0, 1.5], ids=["mask", "tis_then_mask"])
def test_mask_matches_hand(mode, tis_cap, on_policy):
    out, d_logp, dropped = check_against_hand(tensors(), on_policy=on_policy, tis_cap=tis_cap, mode=mode)
    if not on_policy:
        assert dropped == (TOKEN_DROPS if mode == "token" else SEQ_DROPS)
    assert dropped and len(dropped) < 8  # some tokens kept, some dropped
    kept = [t for t in range(len(SEQ)) if t not in dropped and W[t] != 0]
    assert all(d_logp[t] != 0 for t in kept)  # (the KL term reaches clipped tokens too)


def test_masked_tokens_are_not_renormalised():
    """The divisor stays Phi: masking equals setting those tokens' loss_mask to 0, and the
    kept tokens' gradients do not change."""
    c = tensors()
    for mode, drops in (("token", TOKEN_DROPS), ("sequence", SEQ_DROPS)):
        masked, d_masked, _ = run_objective(c, tis_cap=1.5, is_mask=mode, seq_ids=c["seq"])
        zeroed = dict(c, w=c["w"].index_fill(0, torch.tensor(drops), 0.0))
        plain, d_plain, _ = run_objective(zeroed, tis_cap=1.5)
        assert torch.equal(masked.loss, plain.loss) and torch.equal(d_masked, d_plain), mode


def test_off_is_unchanged_bit_for_bit():
    """is_mask 'off' (and a band that contains every ratio) gives what the call without the new
    arguments gives, bit for bit, with and without TIS."""
    c = tensors()
    for tis_cap in (0.0, 1.5):
        base, d_base, e_base = run_objective(c, tis_cap=tis_cap)
        for kw in (dict(is_mask="off", is_mask_low=0.9, is_mask_high=1.1, seq_ids=c["seq"]),
                   dict(is_mask="token", is_mask_low=0.0, is_mask_high=INF),
                   dict(is_mask="sequence", is_mask_low=0.0, is_mask_high=INF, seq_ids=c["seq"])):
            got, d_got, e_got = run_objective(c, tis_cap=tis_cap, **kw)
            assert torch.equal(got.loss, base.loss) and torch.equal(d_got, d_base) and torch.equal(e_got, e_base)
            for k in ("logp", "entropy", "ratio", "kl", "clip_low_frac", "clip_high_frac"):
                assert torch.equal(getattr(got, k), getattr(base, k)), k
            assert torch.equal(got.is_masked, torch.zeros(len(SEQ)))
    # without rollout logprobs at all, as every caller before this option
    out = c3po_objective(c["logp"], c["entropy"], c["adv"], c["w"], c["old"], c["ref"],
                         C3POCoefficients(PHI, EPS_LOW, EPS_HIGH, BETA, ENT))
    assert out.loss.item() == pytest.approx(by_hand(c)[0], rel=1e-6)
    assert torch.equal(out.is_masked, torch.zeros(len(SEQ)))


def test_sequence_ids_are_labels_only():
    """Any integer labels, in any order, that group the tokens alike give the same result."""
    c = tensors()
    ref, d_ref, _ = run_objective(c, is_mask="sequence", seq_ids=c["seq"])
    for labels in ([0, 0, 0, -5, -5, -5, -5, 2, 2], [9, 9, 9, 1, 1, 1, 1, 0, 0]):
        got, d_got, _ = run_objective(c, is_mask="sequence", seq_ids=torch.tensor(labels))
        assert torch.equal(got.loss, ref.loss) and torch.equal(d_got, d_ref)
        assert torch.equal(got.is_masked, ref.is_masked)
    # the row without loss does not count in its sequence's mean, whatever its label
    got, _, _ = run_objective(c, is_mask="sequence", seq_ids=torch.tensor([7, 7, 7, 3, 3, 3, 11, 11, 11]))
    assert torch.equal(got.is_masked, ref.is_masked)


def test_nan_ratio_on_a_live_token_is_masked():
    c = tensors()
    c["rollout"][0] = NAN
    out, d_logp, _ = run_objective(c, is_mask="token")
    assert out.is_masked[0] == 1 and d_logp[0] == 0 and torch.isfinite(out.loss)


# fused_c3po_loss and naive_c3po_loss: the same case on hidden states ---------------------------

T, H, V = len(SEQ), 8, 16


def fused_case():
    """Hidden states and a weight; old and rollout logprobs set so that the ratios are the
    case's, around the logprobs the model gives."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(T, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    targets = torch.randint(0, V, (T,), generator=g)
    with torch.no_grad():
        logp = (hidden.double() @ weight.double().T).log_softmax(-1).gather(1, targets[:, None])[:, 0]
    c = tensors(logp.float().tolist())
    return dict(c, hidden=hidden, weight=weight, targets=targets)


def run_loss(fn, c, **kw):
    hidden, weight = c["hidden"].clone().requires_grad_(True), c["weight"].clone().requires_grad_(True)
    out = fn(hidden, weight, c["targets"], c["adv"], kw.pop("w", c["w"]), c["old"], c["ref"], normalizer=PHI,
             eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=BETA, entropy_coef=ENT, rollout_logp=c["rollout"], **kw)
    out.loss.backward()
    return out, hidden.grad, weight.grad


def fused_torch(*args, **kw):
    return fused_c3po_loss(*args, impl="torch", chunk_tokens=4, chunk_vocab=5, **kw)


@pytest.mark.parametrize("fn", [fused_torch, naive_c3po_loss], ids=["fused_torch", "naive"])
@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_entry_points_pass_the_mask_through(fn, mode):
    c = fused_case()
    drops = TOKEN_DROPS if mode == "token" else SEQ_DROPS
    for tis_cap in (0.0, 1.5):
        out, dh, dw = run_loss(fn, c, tis_cap=tis_cap, is_mask=mode, is_mask_low=LOW, is_mask_high=HIGH,
                               seq_ids=c["seq"])
        assert out.is_masked.nonzero()[:, 0].tolist() == drops
        # what the objective on the model's own logprobs gives, by hand
        hand = by_hand(dict(c, logp=out.logp, entropy=out.entropy), tis_cap=tis_cap, mode=mode)
        assert out.loss.item() == pytest.approx(hand[0], rel=1e-5)
        # masking is a zero weight on those tokens, nothing else (the divisor stays Phi)
        zeroed, dh0, dw0 = run_loss(fn, c, tis_cap=tis_cap, w=c["w"].index_fill(0, torch.tensor(drops), 0.0))
        torch.testing.assert_close(out.loss, zeroed.loss, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(dh, dh0, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(dw, dw0, rtol=1e-6, atol=1e-9)
        assert dh[drops].abs().max() == 0  # no gradient reaches a dropped token's hidden state
        off, dh_off, _ = run_loss(fn, c, tis_cap=tis_cap)
        assert not torch.allclose(dh, dh_off) and torch.equal(off.is_masked, torch.zeros(T))


def test_fused_and_naive_agree():
    c = fused_case()
    kw = dict(tis_cap=1.5, is_mask="sequence", is_mask_low=LOW, is_mask_high=HIGH, seq_ids=c["seq"])
    fused, dh_f, dw_f = run_loss(fused_torch, c, **kw)
    naive, dh_n, dw_n = run_loss(naive_c3po_loss, c, **kw)
    torch.testing.assert_close(fused.loss, naive.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dh_f, dh_n, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw_f, dw_n, rtol=1e-4, atol=1e-6)
    assert torch.equal(fused.is_masked, naive.is_masked)


# argument errors ---------------------------------------------------------------------------------

BAD = [
    (dict(is_mask="tokens"), "is_mask must be one of"),
    (dict(is_mask="token", rollout_logp=None), "is_mask='token' needs rollout_logp"),
    (dict(is_mask="sequence", rollout_logp=None, seq_ids=None), "is_mask='sequence' needs rollout_logp"),
    (dict(is_mask="sequence", seq_ids=None), "needs seq_ids"),
    (dict(is_mask="sequence", seq_ids=torch.zeros(T)), "seq_ids must be an integer tensor"),
    (dict(is_mask="token", is_mask_low=-0.1), r"0 <= is_mask_low < 1 < is_mask_high, got \[-0.1, 2.0\]"),
    (dict(is_mask="token", is_mask_low=1.0), "0 <= is_mask_low < 1 < is_mask_high"),
    (dict(is_mask="token", is_mask_high=1.0), "0 <= is_mask_low < 1 < is_mask_high"),
    (dict(is_mask="sequence", is_mask_low=0.5, is_mask_high=0.8), "0 <= is_mask_low < 1 < is_mask_high"),
    (dict(is_mask="token", is_mask_low=NAN), "0 <= is_mask_low < 1 < is_mask_high"),
    (dict(tis_cap=2.0, rollout_logp=None), "tis_cap > 0 needs rollout_logp"),
]


@pytest.mark.parametrize("entry", ["objective", "fused", "naive"])
@pytest.mark.parametrize("bad,match", BAD)
def test_bad_arguments_are_named(entry, bad, match):
    c = fused_case()
    kw = {"rollout_logp": c["rollout"], "seq_ids": c["seq"], **bad}
    with pytest.raises(ValueError, match=match):
        if entry == "objective":
            rollout, tis_cap = kw.pop("rollout_logp"), kw.pop("tis_cap", 0.0)
            c3po_objective(c["logp"], c["entropy"], c["adv"], c["w"], c["old"], None,
                           C3POCoefficients(PHI), rollout, tis_cap, **kw)
        else:
            fn = fused_torch if entry == "fused" else naive_c3po_loss
            fn(c["hidden"], c["weight"], c["targets"], c["adv"], c["w"], normalizer=PHI, **kw)


def test_fused_checks_the_seq_ids_shape():
    c = fused_case()
    with pytest.raises(ValueError, match=r"seq_ids must be \[9\]"):
        fused_torch(c["hidden"], c["weight"], c["targets"], c["adv"], c["w"], normalizer=PHI,
                    rollout_logp=c["rollout"], is_mask="sequence", seq_ids=torch.zeros(T + 1, dtype=torch.long))
    # "off" reads none of the band arguments
    fused_torch(c["hidden"], c["weight"], c["targets"], c["adv"], c["w"], normalizer=PHI,
                is_mask_low=5.0, is_mask_high=0.1)
