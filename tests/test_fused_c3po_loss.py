"""The fused C3PO loss against a naive fp64 reference: the chunked torch path in process, the
Triton kernels under Triton's interpreter (a subprocess), and TP=2 over gloo (torchrun)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_ring.ops import fused_c3po_loss, logprob_entropy
from tests.conftest import ROOT, run_workers
from tests.workers.fused_loss_tp import KNOBS, TP_CASES, make_case

TRUE_V = 301
METRICS = ("loss", "logp", "entropy", "ratio", "kl", "clip_low", "clip_high")


def reference(hidden, weight, targets, advantages, loss_mask, old_logp=None, ref_logp=None, *,
              normalizer, eps_low, eps_high, beta, entropy_coef, temperature, true_vocab):
    """Written from the definitions, in fp64, with full logits; independent of megatron_ring.ops.
    Returns the metrics and the gradients of hidden and weight."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    logp_all = torch.log_softmax(h @ w[:true_vocab].T / temperature, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    logp = logp_all.gather(1, targets.clamp(0, true_vocab - 1)[:, None])[:, 0]
    live = loss_mask != 0
    old = logp.detach() if old_logp is None else old_logp.double()
    ratio = torch.exp(logp - old)
    adv = advantages.double()
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta:
        d = ref_logp.double() - logp
        kl = d.exp() - d - 1
    per_token = surrogate - beta * kl + entropy_coef * entropy
    loss = -(per_token * loss_mask.double())[live].sum() / normalizer
    loss.backward()
    n = max(int(live.sum()), 1)
    r = ratio.detach()
    return dict(loss=loss.detach(), logp=logp.detach(), entropy=entropy.detach(), ratio=r, kl=kl.detach(),
                clip_low=((adv < 0) & (r < 1 - eps_low) & live).sum() / n,
                clip_high=((adv > 0) & (r > 1 + eps_high) & live).sum() / n,
                dh=h.grad, dw=w.grad, live=live)


def case_reference(case, knobs=KNOBS, true_vocab=TRUE_V, old=True, ref=True):
    return reference(case["hidden"], case["weight"], case["targets"], case["advantages"],
                     case["loss_mask"], case["old_logp"] if old else None,
                     case["ref_logp"] if ref else None, true_vocab=true_vocab, **knobs)


def run_fused(case, knobs=KNOBS, old=True, ref=True, **kw):
    hidden = case["hidden"].clone().requires_grad_(True)
    weight = case["weight"].clone().requires_grad_(True)
    out = fused_c3po_loss(hidden, weight, case["targets"], case["advantages"], case["loss_mask"],
                          case["old_logp"] if old else None, case["ref_logp"] if ref else None,
                          **{"true_vocab_size": TRUE_V, "impl": "torch", **knobs, **kw})
    out.loss.backward()
    return dict(loss=out.loss.detach(), logp=out.logp, entropy=out.entropy, ratio=out.ratio, kl=out.kl,
                clip_low=out.clip_low_frac, clip_high=out.clip_high_frac, dh=hidden.grad, dw=weight.grad)


def assert_matches(got, want, rtol=2e-5, atol=2e-6, keys=METRICS + ("dh", "dw")):
    live = want["live"]
    for k in keys:
        g, w = got[k].double(), want[k].double()
        if k in ("ratio", "kl"):  # defined on loss-carrying tokens only (1 and 0 elsewhere)
            assert torch.equal(g[~live], torch.full_like(g[~live], 1.0 if k == "ratio" else 0.0)), k
            g, w = g[live], w[live]
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("chunks", [(7, 64), (1024, 8192), (24, 13)])
def test_torch_path_matches_reference(chunks):
    case = make_case()
    want = case_reference(case)
    got = run_fused(case, chunk_tokens=chunks[0], chunk_vocab=chunks[1])
    assert_matches(got, want)
    # the case exercises both clip bounds, the KL and masked rows, or it proves little
    assert want["clip_low"] > 0 and want["clip_high"] > 0 and want["kl"].abs().max() > 1e-3
    assert got["dw"][TRUE_V:].abs().max() == 0  # padding rows: no gradient
    assert got["dh"][case["loss_mask"] == 0].abs().max() == 0


@pytest.mark.parametrize("old,ref,beta", [(False, True, 0.05), (True, False, 0.05), (True, True, 0.0)])
def test_optional_terms(old, ref, beta):
    case = make_case(seed=1)
    knobs = dict(KNOBS, beta=beta)
    want = case_reference(case, knobs, old=old, ref=ref)
    got = run_fused(case, knobs, old=old, ref=ref, chunk_tokens=5, chunk_vocab=100)
    assert_matches(got, want)
    if not old:  # on-policy: ratio exactly 1, nothing clipped, the gradient still flows
        assert torch.equal(got["ratio"], torch.ones_like(got["ratio"])) and got["clip_low"] == 0
        assert got["dh"].abs().max() > 0
    if not (ref and beta):
        assert torch.equal(got["kl"], torch.zeros_like(got["kl"]))


def test_temperature_and_normalizer_scale():
    case = make_case(seed=2)
    base = run_fused(case, dict(KNOBS, temperature=1.0))
    unit = dict(KNOBS, temperature=1.0)
    hot = run_fused(case, dict(KNOBS, temperature=1.7))
    assert_matches(hot, case_reference(case, dict(KNOBS, temperature=1.7)))
    assert not torch.allclose(base["entropy"], hot["entropy"])
    # the divisor is the constant Phi: doubling it halves loss and gradients, nothing else
    double = run_fused(case, dict(unit, normalizer=2 * KNOBS["normalizer"]))
    torch.testing.assert_close(double["loss"] * 2, base["loss"])
    torch.testing.assert_close(double["dw"] * 2, base["dw"])


def test_masked_rows_are_inert():
    """Garbage on masked rows (NaN advantage, -inf logps, ignore-index target) changes nothing;
    a fully masked input gives zero loss and zero gradients, without NaN."""
    case = make_case(seed=3)
    clean = run_fused(case)
    dirty = dict(case)
    dead = case["loss_mask"] == 0
    for key, value in (("advantages", float("nan")), ("old_logp", float("-inf")), ("ref_logp", float("nan"))):
        dirty[key] = case[key].masked_fill(dead, value)
    dirty["targets"] = case["targets"].masked_fill(dead, -100)
    got = run_fused(dirty)
    for k in ("loss", "dh", "dw", "clip_low", "clip_high"):
        assert torch.equal(got[k], clean[k]), k
    none = dict(dirty, loss_mask=torch.zeros_like(case["loss_mask"]))
    got = run_fused(none)
    assert got["loss"] == 0 and got["clip_low"] == 0 and got["clip_high"] == 0
    assert got["dh"].abs().max() == 0 and got["dw"].abs().max() == 0
    assert all(torch.isfinite(got[k]).all() for k in ("logp", "entropy", "ratio", "kl"))


def test_bf16_inputs():
    case = make_case(seed=4, dtype=torch.bfloat16)
    got = run_fused(case)
    want = case_reference(case)
    assert got["dh"].dtype == torch.bfloat16 and got["dw"].dtype == torch.bfloat16
    assert_matches(got, want, rtol=2e-2, atol=2e-3)


def test_logprob_entropy_keeps_no_graph():
    case = make_case(seed=5)
    hidden = case["hidden"].requires_grad_(True)
    with torch.no_grad():
        logp, entropy = logprob_entropy(hidden, case["weight"], case["targets"], temperature=0.8,
                                        true_vocab_size=TRUE_V, chunk_tokens=5, chunk_vocab=50, impl="torch")
    want = case_reference(case)
    assert logp.grad_fn is None and not logp.requires_grad and logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), want["logp"], rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(entropy.double(), want["entropy"], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("entropy_coef", [0.0, 0.3], ids=["logp_only", "with_entropy"])
def test_logprob_entropy_gradients_match_reference(entropy_coef):
    """The op on its own (what the SFT loss uses): -sum(logp * mask) (+ c * sum(entropy * mask))
    has the gradients of the fp64 full-logits definition, for hidden and weight; masked rows
    may hold targets outside the vocabulary."""
    case = make_case(seed=7)
    mask = case["loss_mask"]
    targets = torch.where(mask != 0, case["targets"], torch.full_like(case["targets"], -100))
    h = case["hidden"].clone().requires_grad_(True)
    w = case["weight"].clone().requires_grad_(True)
    logp, entropy = logprob_entropy(h, w, targets, temperature=0.8, true_vocab_size=TRUE_V, loss_mask=mask,
                                    chunk_tokens=7, chunk_vocab=64, impl="torch")
    (-(logp * mask).sum() + entropy_coef * (entropy * mask).sum()).backward()
    hd, wd = case["hidden"].double().requires_grad_(True), case["weight"].double().requires_grad_(True)
    all_logp = torch.log_softmax(hd @ wd[:TRUE_V].T / 0.8, dim=-1)
    want_logp = all_logp.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    want_entropy = -(all_logp.exp() * all_logp).sum(-1)
    (-(want_logp * mask.double()).sum() + entropy_coef * (want_entropy * mask.double()).sum()).backward()
    live = mask != 0
    torch.testing.assert_close(logp.detach().double()[live], want_logp.detach()[live], rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(entropy.detach().double(), want_entropy.detach(), rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=2e-5, atol=2e-6)
    assert torch.equal(w.grad[TRUE_V:], torch.zeros_like(w.grad[TRUE_V:]))  # padding rows


def test_fused_c3po_loss_is_logprob_entropy_plus_objective():
    """fused_c3po_loss builds on the public op: the same logp/entropy bit for bit."""
    case = make_case(seed=8)
    got = run_fused(case, chunk_tokens=7, chunk_vocab=64)
    with torch.no_grad():
        logp, entropy = logprob_entropy(case["hidden"], case["weight"], case["targets"],
                                        temperature=KNOBS["temperature"], true_vocab_size=TRUE_V,
                                        chunk_tokens=7, chunk_vocab=64, impl="torch")
    assert torch.equal(got["logp"], logp) and torch.equal(got["entropy"], entropy)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_no_tensor_scales_with_tokens_times_vocab():
    tokens, hid, vocab = 256, 8, 2000
    case = make_case(seed=6, tokens=tokens, hidden=hid, true_vocab=vocab, padded_vocab=vocab)
    with _LargestTensor() as probe:
        run_fused(case, true_vocab_size=vocab, chunk_tokens=32, chunk_vocab=128)
    assert probe.numel <= max(vocab * hid, 32 * 128), probe.numel  # T*V would be 512000


@pytest.mark.parametrize("bad,match", [
    (dict(hidden=torch.zeros(24, 31)), "hidden size differs"),
    (dict(targets=torch.zeros(23, dtype=torch.long)), r"targets must be \[24\]"),
    (dict(advantages=torch.zeros(24, 1)), r"advantages must be \[24\]"),
    (dict(targets=torch.full((24,), TRUE_V)), r"targets\[0\] = 301 is outside"),
    (dict(impl="cuda"), "impl must be one of"),
    (dict(normalizer=0.0), "normalizer must be > 0"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(true_vocab_size=400), "must hold the whole vocabulary"),
    (dict(sequence_parallel=True, targets=torch.zeros(48, dtype=torch.long)), r"targets must be \[24\]"),
])
def test_bad_arguments_are_named(bad, match):
    case = make_case()
    kw = dict(KNOBS, true_vocab_size=TRUE_V, impl="torch")
    for k in ("normalizer", "temperature", "impl", "true_vocab_size", "sequence_parallel"):
        if k in bad:
            kw[k] = bad.pop(k)
    case.update(bad)
    with pytest.raises(ValueError, match=match):
        fused_c3po_loss(case["hidden"], case["weight"], case["targets"], case["advantages"],
                        case["loss_mask"], **kw)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not importable")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted here")
def test_triton_on_cpu_without_interpreter_is_refused():
    case = make_case()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_c3po_loss(case["hidden"], case["weight"], case["targets"], case["advantages"],
                        case["loss_mask"], **dict(KNOBS, true_vocab_size=TRUE_V, impl="triton"))


@pytest.mark.slow  # the GPU kernels under the interpreter; the CPU path is the torch backend
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not importable")
def test_triton_kernels_interpreted_match_reference(tmp_path):
    from tests.workers.fused_loss_triton import CASES

    out = tmp_path / "triton.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tests.workers.fused_loss_triton", "--out", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(out)
    assert set(results) == set(CASES)
    for name, (dtype, *_rest) in CASES.items():
        want = case_reference(make_case(dtype=dtype))
        tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else {}
        assert_matches(results[name], want, **tol)
        torch.testing.assert_close(results[name]["fwd_logp"].double(), want["logp"], **(tol or dict(rtol=2e-5, atol=2e-6)))
        torch.testing.assert_close(results[name]["fwd_entropy"].double(), want["entropy"], **(tol or dict(rtol=2e-5, atol=2e-6)))


def test_tensor_parallel_gloo_equals_single_process(tmp_path):
    out = tmp_path / "tp.pt"
    run_workers("fused_loss_tp", 2, "--out", out, timeout=300)
    results = torch.load(out)
    for name, (true_vocab, padded, _sp) in TP_CASES.items():
        got = results[name]
        want = case_reference(make_case(true_vocab=true_vocab, padded_vocab=padded), true_vocab=true_vocab)
        assert_matches(got, want)
        assert got["logp_spread"] == 0, name
        assert got["dw"][true_vocab:].abs().max() == 0, name


# On a CUDA GPU (skipped without one): the compiled Triton kernels, and the torch path, against the
# fp64 reference. "tiled" has a hidden size, a vocabulary and chunks that are no multiple of the
# GPU blocks (64 tokens, 128 vocabulary rows, 64 hidden), several forward splits (> 8192 rows) and
# padding rows; its old log-probs keep every ratio >= 0.07 in log space from a clip bound, so that
# bf16 rounding cannot flip a token's clip branch (which would change its gradient outright).
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
CUDA_SHAPES = {  # name -> (make_case arguments, chunk_tokens, chunk_vocab)
    "small": (dict(tokens=24, hidden=32, true_vocab=TRUE_V, padded_vocab=320), None, None),
    "tiled": (dict(tokens=300, hidden=96, true_vocab=20000, padded_vocab=20032), 100, 3000),
}
DEVICE_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}


def device_case(shape: str, dtype, seed: int = 7):
    args, _, _ = CUDA_SHAPES[shape]
    case = make_case(seed=seed, dtype=dtype, **args)
    tv = args["true_vocab"]
    with torch.no_grad():  # log-probs of the inputs as they are (after the cast to dtype)
        z = case["hidden"].double() @ case["weight"][:tv].double().T / KNOBS["temperature"]
        logp = z.log_softmax(-1).gather(1, case["targets"][:, None])[:, 0]
    g = torch.Generator().manual_seed(seed)
    n = logp.shape[0]
    log_ratio = torch.tensor([-0.5, -0.1, 0.1, 0.5])[torch.randint(0, 4, (n,), generator=g)]
    log_ratio += 0.1 * torch.rand(n, generator=g) - 0.05
    case["old_logp"] = (logp - log_ratio).float()
    return case, tv


def run_fused_on(case, true_vocab: int, device, impl: str, **kw):
    """fused_c3po_loss and logprob_entropy on `device`; the results come back to the CPU."""
    c = {k: v.to(device) for k, v in case.items()}
    hidden = c["hidden"].clone().requires_grad_(True)
    weight = c["weight"].clone().requires_grad_(True)
    out = fused_c3po_loss(hidden, weight, c["targets"], c["advantages"], c["loss_mask"], c["old_logp"],
                          c["ref_logp"], true_vocab_size=true_vocab, impl=impl, **KNOBS, **kw)
    out.loss.backward()
    with torch.no_grad():
        fwd_logp, fwd_entropy = logprob_entropy(hidden, weight, c["targets"], temperature=KNOBS["temperature"],
                                                true_vocab_size=true_vocab, loss_mask=c["loss_mask"],
                                                impl=impl, **kw)
    got = dict(loss=out.loss.detach(), logp=out.logp, entropy=out.entropy, ratio=out.ratio, kl=out.kl,
               clip_low=out.clip_low_frac, clip_high=out.clip_high_frac, dh=hidden.grad, dw=weight.grad,
               fwd_logp=fwd_logp, fwd_entropy=fwd_entropy)
    return {k: v.cpu() for k, v in got.items()}


def check_on_device(shape: str, dtype, impl: str, device):
    case, tv = device_case(shape, dtype)
    _, chunk_tokens, chunk_vocab = CUDA_SHAPES[shape]
    want = case_reference(case, true_vocab=tv)
    got = run_fused_on(case, tv, device, impl, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    assert got["dh"].dtype == dtype and got["dw"].dtype == dtype
    tol = DEVICE_TOL[dtype]
    assert_matches(got, want, **tol)
    for k in ("logp", "entropy"):  # the forward-only pass gives what the loss's forward gave
        torch.testing.assert_close(got[f"fwd_{k}"].double(), want[k], **tol, msg=lambda m: f"fwd_{k}: {m}")
    assert want["clip_low"] > 0 and want["clip_high"] > 0 and want["kl"].abs().max() > 1e-3
    assert got["dw"][tv:].abs().max() == 0  # padding rows: no gradient
    assert got["dh"][case["loss_mask"] == 0].abs().max() == 0
    return got, want


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", sorted(CUDA_SHAPES))
def test_cuda_matches_reference(shape, dtype, impl):
    if impl == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not importable")
    check_on_device(shape, dtype, impl, "cuda")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
def test_cuda_auto_is_triton():
    case, tv = device_case("small", torch.bfloat16)
    auto = run_fused_on(case, tv, "cuda", "auto")
    triton = run_fused_on(case, tv, "cuda", "triton")
    for k in ("loss", "dh", "dw"):
        assert torch.equal(auto[k], triton[k]), k
