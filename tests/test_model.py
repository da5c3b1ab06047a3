"""Presets, layouts, routing and the CPU layer: fast checks without process groups."""

import json
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT
from megatron_ring.models.presets import get_preset
from megatron_ring.platform import cpu_compat
from megatron_ring.platform.layout import Layout, LayoutError


def cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_ring.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # the CLI in a subprocess (imports Megatron)
def test_ling_lite_counts_from_the_megatron_model():
    r = cli("model-info", "--preset", "ling-lite", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["total_params"] == pytest.approx(16.8e9, rel=5e-3)
    assert info["active_params"] == pytest.approx(2.75e9, rel=5e-3)


@pytest.mark.slow  # the CLI in a subprocess (imports Megatron)
def test_unknown_preset_is_refused():
    r = cli("model-info", "--preset", "ling-huge")
    assert r.returncode == 2 and "unknown model preset 'ling-huge'" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (("distill", "recipes/tiny/distill.yaml", "parallel.ep=3", "cluster.gpus_per_node=3"),
     "num_experts=8 is not divisible by ep=3"),
    (("distill", "recipes/tiny/distill.yaml", "parallel.tp=3", "parallel.ep=1", "cluster.gpus_per_node=3"),
     "num_attention_heads=4 is not divisible by tp=3"),
])
def test_impossible_layout_is_refused_before_any_process_starts(args, needle, tmp_path):
    t0 = time.monotonic()
    r = cli(*args, "--run-dir", tmp_path / "run")
    assert r.returncode == 2 and needle in r.stderr
    assert "torch.distributed" not in r.stderr and not (tmp_path / "run").exists()
    assert time.monotonic() - t0 < 120


def test_layout_validation_lists_every_problem():
    with pytest.raises(LayoutError) as e:
        Layout(tp=3, ep=3, world_size=3).validate(get_preset("ling-tiny"))
    assert "num_experts=8" in str(e.value) and "num_query_groups=2" in str(e.value)


def test_megatron_router_options_reproduce_ling_routing():
    """Ling: softmax in fp32 over all experts, top-k, renormalise. Megatron with
    pre_softmax=False: top-k logits, softmax over them. Same weights and experts."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    logits = torch.randn(64, 8, dtype=torch.float32) * 3
    probs, routing_map = topk_routing_with_score_function(logits, 2, use_pre_softmax=False,
                                                          score_function="softmax")
    p = torch.softmax(logits, dim=-1)
    top, idx = p.topk(2, dim=-1)
    expected = torch.zeros_like(p).scatter(1, idx, top / top.sum(-1, keepdim=True))
    assert torch.equal(routing_map, expected > 0)
    assert torch.allclose(probs, expected, atol=1e-6)


def test_cpu_layer_refuses_another_megatron_version(monkeypatch):
    from megatron.core import package_info

    monkeypatch.setattr(package_info, "__version__", "0.17.0")
    with pytest.raises(RuntimeError, match="written for megatron-core==0.16.1, but megatron-core 0.17.0"):
        cpu_compat._check_version()


def test_norm_head_leaves_padded_vocabulary_rows_out(monkeypatch):
    """Megatron pads the vocabulary (1000 -> 1024 rows for ling-tiny); a randomly initialised model
    has nonzero padding rows, which must not enter the column norms: the real rows come out as the
    definition gives them for the true [1000, H] weight, and the gradient skips the norm."""
    from megatron.core import parallel_state as ps

    from megatron_ring.models.builder import norm_head_weight
    from tests.hf_reference import norm_head

    monkeypatch.setattr(ps, "_MPU_TENSOR_MODEL_PARALLEL_RANK", 0)
    monkeypatch.setattr(ps, "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE", 1)
    w = torch.randn(1024, 64, dtype=torch.float64)
    w[1000:] *= 50.0  # padding rows far larger than the rest: counting them would show
    w.requires_grad_(True)
    got = norm_head_weight(w, 1000)
    want = norm_head(w[:1000].detach())
    torch.testing.assert_close(got[:1000], want, rtol=1e-12, atol=0)
    g = torch.randn(1024, 64, dtype=torch.float64)
    (got * g).sum().backward()
    torch.testing.assert_close(w.grad, g / (w[:1000].detach().norm(dim=0) + 1e-7))


@pytest.mark.slow  # a model in a subprocess; the equivalence tests read hidden_states() through every loss
@pytest.mark.parametrize("norm_head", [False, True], ids=["plain", "norm_head"])
def test_hidden_states_times_output_weight_are_the_logits(tiny_hf, tiny_hf_normhead, tmp_path, norm_head):
    """The losses read LingModel.hidden_states() and output_weight() instead of forward()'s
    logits: forward() must equal hidden_states() @ output_weight().T (causal and packed rows),
    or a Megatron upgrade that changes GPTModel.forward fails here. Also: the norm_head output
    layer is built without an RNG draw or a second weight (the same model as without it)."""
    from tests.conftest import run_workers

    out = tmp_path / "hs.json"
    run_workers("hidden_states", 1, "--hf", tiny_hf_normhead if norm_head else tiny_hf, "--out", out)
    r = json.loads(out.read_text())
    assert r["hidden_shape"][:2] == [48, 2] and r["logit_scale"] > 0.1, r
    assert max(r["max_abs_diff"].values()) <= 1e-5 * r["logit_scale"], r
    assert r["norm_head_layer"] == norm_head
    assert r["same_init_with_norm_head"] and r["rng_same"], r
    assert r["norm_head_output_params"] == ["output_layer.weight"], r
