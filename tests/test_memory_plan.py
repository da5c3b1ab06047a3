"""The memory plan (launch/memory_plan.py) against what ling-tiny really allocates in one CPU
process (tests/workers/memory_plan_probe.py, run as a script: the CPU layer patches torch for the
whole process), recompute against no recompute, and `megatron-ring plan` / --dry-run."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from megatron_ring.launch import memory_plan
from megatron_ring.models.presets import get_preset
from megatron_ring.models.recompute import recompute_kwargs
from megatron_ring.platform.layout import Layout
from tests.conftest import ROOT


def _probe(*args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.workers.memory_plan_probe", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        pytest.fail(f"probe {args} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("dtype,nbytes", [("fp32", 4), ("bf16", 2)])
def test_state_bytes_equal_what_ling_tiny_allocates(dtype, nbytes):
    """params (DDP's param buffer), fp32 grad buffers, Adam m/v (+ fp32 main params for bf16)."""
    measured = _probe("state", dtype)
    assert memory_plan.state_bytes(get_preset("ling-tiny"), Layout(1, 1, 1), nbytes) == measured


def test_activation_plan_within_25_percent_of_profiler_peak():
    arch = get_preset("ling-tiny")
    measured = _probe("peak", 1024, 2048)
    for t in (1024, 2048):
        shape = memory_plan.Shape(tokens=t, seq=t, act_bytes=4, tp=1, te=False)
        predicted = sum(memory_plan.activation_bytes(arch, shape, None, memory_plan.padded_vocab(arch, 1)).values())
        assert abs(predicted / measured[str(t)] - 1) <= 0.25, (t, predicted, measured[str(t)])


@pytest.mark.parametrize("granularity,modules,layers", [  # `make test-fast`: one case
    pytest.param("selective", "moe", 1, marks=pytest.mark.slow),
    pytest.param("selective", "shared_experts", 1, marks=pytest.mark.slow),
    pytest.param("selective", "core_attn", 1, marks=pytest.mark.slow),
    ("full", "core_attn", 3),  # attention rebuilt in backward: platform/cpu_compat.py's causal mask
])
def test_recompute_changes_no_loss_or_gradient(granularity, modules, layers):
    out = _probe("recompute", granularity, modules, layers)
    assert out["loss"][0] == pytest.approx(out["loss"][1], rel=1e-6, abs=0)
    assert out["max_grad"] > 0 and out["max_grad_diff"] <= 1e-6 * out["max_grad"]


def test_recompute_settings_megatron_would_refuse_name_the_key():
    rc = lambda g, m=("core_attn",), n=1: SimpleNamespace(granularity=g, modules=list(m), num_layers=n)
    assert recompute_kwargs(rc("none"), 28, False) == {"recompute_granularity": None}
    assert recompute_kwargs(rc("full", n=7), 28, True) == {
        "recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 7}
    for bad, key in ((rc("full", n=5), "num_layers"), (rc("selective", ["mlp"]), "modules"),
                     (rc("selective", ["moe_act"]), "modules"), (rc("selective", ["layernorm"]), "modules")):
        with pytest.raises(ValueError, match=f"train.recompute.{key}"):
            recompute_kwargs(bad, 28, False)
    assert recompute_kwargs(rc("selective", ["moe_act", "layernorm"]), 28, True)["recompute_modules"] == [
        "moe_act", "layernorm"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_ring.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def test_plan_json_phases_and_recompute_lowering_the_peak():
    base = _cli("plan", "recipes/ling_lite/rl_stage2_code_science.yaml", "--json")
    assert base.returncode == 0, base.stderr
    plan = json.loads(base.stdout)
    assert set(plan["phases"]) == {"rollout", "logprob", "update"}
    assert plan["total_gb"] == max(p["total_gb"] for p in plan["phases"].values())
    for phase in plan["phases"].values():
        parts = sum(v for k, v in phase.items() if k != "total_gb")
        assert phase["total_gb"] == pytest.approx(parts, abs=0.01)
    # rollout.offload: gradients leave the GPU while the engine rolls out, the engine while the trainer trains
    assert "grads" not in plan["phases"]["rollout"] and "rollout_engine" not in plan["phases"]["update"]
    full = json.loads(_cli("plan", "recipes/ling_lite/rl_stage2_code_science.yaml", "--json",
                           "train.recompute.granularity=full").stdout)
    assert full["phases"]["update"]["activations"] < plan["phases"]["update"]["activations"] / 5


def test_dry_run_stops_when_the_plan_exceeds_gpu_memory():
    ok = _cli("distill", "recipes/ling_lite/distill.yaml", "--dry-run", "train.recompute.granularity=full")
    assert ok.returncode == 0, ok.stderr
    assert "memory plan, per GPU" in ok.stdout
    over = _cli("distill", "recipes/ling_lite/distill.yaml", "--dry-run", "cluster.gpu_memory_gb=40")
    assert over.returncode == 2 and "cluster.gpu_memory_gb 40" in over.stderr
