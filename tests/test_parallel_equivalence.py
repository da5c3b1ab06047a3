"""The same weights give the same loss, logits and gradients at every TP/EP layout (2 gloo
processes against one), and the logits equal an independent plain-PyTorch forward of the HF
weights. Aux (1e-2) and z-loss (1e-3) are on, so router-loss scaling is part of the check."""

import pytest
import torch

from tests.conftest import run_workers
from tests.hf_reference import hf_forward
from tests.workers.forward_backward import fixed_batch
from megatron_ring.models.hf_checkpoint import HFReader

# fp32 on CPU: reductions happen in a different order per layout. Measured differences were
# < 5e-6 relative; 1e-4 leaves room for BLAS differences and still catches any real mistake
# (a missing reduction or a mis-sharded tensor gives O(1) errors).
RTOL = 1e-4
LAYOUTS = [(2, 1), (1, 2), (2, 2)]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.fixture(scope="module")
def reference(tiny_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("eq") / "tp1ep1.pt"
    run_workers("forward_backward", 1, "--hf", tiny_hf, "--out", out)
    return torch.load(out)


def test_megatron_logits_equal_independent_hf_forward(tiny_hf, reference):
    reader = HFReader(tiny_hf)
    ids, _, _ = fixed_batch(reader.arch.vocab_size)
    expected = hf_forward({n: reader.read(n) for n in reader.file_of}, reader.config, ids)
    assert reference["logits"].shape == expected.shape
    assert _rel(reference["logits"], expected) < RTOL


@pytest.mark.parametrize("tp,ep", LAYOUTS, ids=[f"tp{t}ep{e}" for t, e in LAYOUTS])
def test_layout_matches_single_process(tiny_hf, reference, tmp_path, tp, ep):
    out = tmp_path / "out.pt"
    run_workers("forward_backward", 2, "--hf", tiny_hf, "--tp", tp, "--ep", ep, "--out", out)
    got = torch.load(out)
    assert got["tokens"] == reference["tokens"]
    assert got["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    assert _rel(got["logits"], reference["logits"]) < RTOL
    assert set(got["grads"]) == set(reference["grads"])
    worst = max(got["grads"], key=lambda k: _rel(got["grads"][k], reference["grads"][k]))
    assert _rel(got["grads"][worst], reference["grads"][worst]) < RTOL, worst
    # Every tensor really received gradient (a silently detached parameter would pass above).
    assert all(g.abs().sum() > 0 for g in got["grads"].values())


def test_norm_head_under_tensor_parallelism(tiny_hf_normhead, tmp_path):
    out = tmp_path / "nh.pt"
    run_workers("forward_backward", 2, "--hf", tiny_hf_normhead, "--tp", 2, "--ep", 2, "--out", out)
    reader = HFReader(tiny_hf_normhead)
    assert reader.arch.norm_head
    ids, _, _ = fixed_batch(reader.arch.vocab_size)
    expected = hf_forward({n: reader.read(n) for n in reader.file_of}, reader.config, ids)
    assert _rel(torch.load(out)["logits"], expected) < RTOL
