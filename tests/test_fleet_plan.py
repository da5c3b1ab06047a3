"""The rollout fleet of an RL recipe (rollout/fleet_plan.py): engine counts resolved from the
cluster (colocated on the training nodes, or on dedicated ones), checks that name the recipe
keys, the per-request clamp of max_new_tokens, and what `rl --dry-run` prints of it."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from megatron_ring.cli import main
from megatron_ring.recipe import load_recipe
from megatron_ring.recipe.typed import FieldError
from megatron_ring.rollout import fleet_plan
from megatron_ring.rollout.fleet_plan import FleetPlan, clamp_max_new_tokens
from tests.conftest import ROOT

RL1 = ROOT / "recipes/ling_lite/rl_stage1_math.yaml"
RL2 = ROOT / "recipes/ling_lite/rl_stage2_code_science.yaml"
DEDICATED = ["cluster.sglang=dedicated", "cluster.sglang_nodes=2"]


def plan(*sets: str, recipe=RL1) -> FleetPlan:
    return FleetPlan.of(load_recipe(recipe, list(sets)))


def test_paper_recipes_run_128_colocated_engines_behind_the_router():
    p = plan()
    assert (p.placement, p.url, p.engine_tp, p.engines, p.engines_per_node, p.hosts) == ("colocated", None, 2, 128, 4, 32)
    assert p.base_gpu_ids == [0, 2, 4, 6] and p.router and p.context_length == 32768
    assert p.server_args == ["--dtype", "bfloat16", "--mem-fraction-static", "0.85", "--enable-return-routed-experts", "--tp", "2", "--context-length", "32768",
                             "--enable-memory-saver"]  # rollout.offload: the engines release memory while the trainer trains
    assert (p.weight_sync, p.offload) == ("tensor", True)
    assert p.concurrency == 64 * p.engines  # one request per sample: every engine kept busy with 64 sequences
    assert plan(recipe=RL2).engines == 128


@pytest.mark.parametrize("sets, engines, per_node, hosts, gpus, router", [
    ([], 128, 4, 32, [0, 2, 4, 6], True),                                  # auto: 32 nodes x 8 / 2
    (["rollout.engine_tp=1"], 256, 8, 32, list(range(8)), True),
    (["rollout.engine_tp=8", "cluster.nodes=1"], 1, 1, 1, [0], False),      # one engine: no router
    (["rollout.engines=4"], 4, 1, 4, [0], True),                            # on 4 of the 32 nodes
    (DEDICATED, 8, 4, 2, [0, 2, 4, 6], True),                               # auto: 2 sglang nodes x 8 / 2
    ([*DEDICATED, "rollout.engines=7"], 7, 4, 2, [0, 2, 4, 6], True),       # the last node runs 3
    (["cluster.sglang=dedicated", "cluster.sglang_nodes=1", "rollout.engine_tp=8"], 1, 1, 1, [0], True),
])
def test_engine_counts(sets, engines, per_node, hosts, gpus, router):
    p = plan(*sets)
    assert (p.engines, p.engines_per_node, p.hosts, p.base_gpu_ids, p.router) == (engines, per_node, hosts, gpus, router)
    assert sum(p.node_engines(n) for n in range(p.hosts + 1)) == engines
    assert p.placement == ("dedicated" if "cluster.sglang=dedicated" in sets else "colocated")


def test_a_given_url_is_used_as_is_and_other_engines_have_no_fleet():
    p = plan("rollout.url=http://router:29000", "rollout.server_args=[--tp, '4']")  # not started: not checked
    assert (p.placement, p.url, p.router, p.hosts, p.server_args) == ("given", "http://router:29000", False, 0, [])
    assert "the server at http://router:29000 (rollout.url), used as is" in p.describe()[0]
    assert plan("rollout.engine=embedded") is None
    assert FleetPlan.of(load_recipe(ROOT / "recipes/ling_lite/distill.yaml")) is None


def test_context_length():
    assert plan("rollout.context_length=16384").context_length == 16384
    assert plan("model.max_position_embeddings=20000").context_length == 20000
    assert plan("model.max_position_embeddings=null").context_length == 32768  # the ling-lite preset's
    assert plan("rollout.context_length=16384").server_args[-3:-1] == ["--context-length", "16384"]


@pytest.mark.parametrize("sets, keys, message", [
    (["rollout.engine_tp=3"], ("rollout.engine_tp", "cluster.gpus_per_node"),
     "rollout.engine_tp: 3 does not divide cluster.gpus_per_node 8"),
    (["rollout.engines=129"], ("rollout.engines", "rollout.engine_tp", "cluster.nodes"),
     "rollout.engines: 129 engines of --tp 2 need 258 GPUs; the 32 colocated node(s) (cluster.nodes) have 256"),
    ([*DEDICATED, "rollout.engines=9"], ("rollout.engines", "rollout.engine_tp", "cluster.sglang_nodes"),
     "the 2 dedicated node(s) (cluster.sglang_nodes) have 16 (at most 8 engines)"),
    (["rollout.server_args=[--tp, '2']"], ("rollout.server_args",),
     "rollout.server_args: --tp is set by the fleet (decided by rollout.engine_tp)"),
    (["rollout.server_args=[--dp-size, '4']"], ("rollout.server_args",), "--dp-size is set by the fleet (decided by rollout.engines)"),
    (["rollout.server_args=[--port=30001]"], ("rollout.server_args",), "--port is set by the fleet"),
    (["rollout.server_args=[--base-gpu-id, '2']"], ("rollout.server_args",), "--base-gpu-id is set by the fleet"),
    (["rollout.server_args=[--host, 0.0.0.0]"], ("rollout.server_args",), "--host is set by the fleet"),
    (["rollout.server_args=[--tp-size, '2']"], ("rollout.server_args",), "--tp-size is set by the fleet"),
    (["rollout.server_args=[--dp, '2']"], ("rollout.server_args",), "--dp is set by the fleet"),
    (["rollout.server_args=[--context-length, '8192']"], ("rollout.server_args",), "(decided by rollout.context_length)"),
])
def test_errors_name_the_keys(sets, keys, message):
    with pytest.raises(FieldError) as e:
        plan(*sets)
    assert e.value.keys == keys and message in str(e.value)


def test_a_bad_fleet_stops_the_command_naming_the_key(capsys):
    assert main(["rl", str(RL1), "--dry-run", "rollout.server_args=[--tp, '2']"]) == 2
    assert "megatron-ring rl: error: rollout.server_args: --tp is set by the fleet" in capsys.readouterr().err
    # A launch says it before any process starts (and before the input checks).
    assert main(["rl", str(RL1), "cluster.nodes=1", "rollout.engine_tp=16", "--run-dir", "/nonexistent/x"]) == 2
    assert "rollout.engine_tp: 16 does not divide cluster.gpus_per_node 8" in capsys.readouterr().err


@pytest.mark.parametrize("max_new, prompt, context, expected", [
    (24576, 500, 32768, 24576),   # room to spare
    (32768, 500, 32768, 32267),   # stage 2: max_new_tokens == context, the clamp binds
    (32768, 32767, 32768, 0),     # no room: the caller skips the prompt
    (100, 40000, 32768, -7233),
    (100, 5, 0, 100),             # context unknown
])
def test_clamp(max_new, prompt, context, expected):
    assert clamp_max_new_tokens(max_new, prompt, context) == expected


def test_describe(monkeypatch):
    lines = plan().describe()
    assert lines[0] == ("rollout fleet: 128 SGLang engines (--tp 2, dp 1), colocated on the 32 training nodes (4 per "
                        f"node, --base-gpu-id 0 2 4 6), behind sglang-router {fleet_plan.router_version()} (round_robin); "
                        "the trainer sends every request to the router")
    assert lines[-2] == "max_new_tokens 24576 clamped per request to min(24576, 32768 - prompt - 1)"
    assert "the clamp binds" in plan(recipe=RL2).describe()[-2]
    assert lines[-1].startswith("weights after every step (tensor): every training GPU hands its colocated engine "
                                "rank 512 MB flat buckets (CUDA IPC); 4 tensors read back") and "offload:" in lines[-1]
    text = "\n".join(plan(*DEDICATED).describe())
    assert "weights after every step (distributed): rank 0 broadcasts" in text and "offload" not in text
    assert "8 SGLang engines (--tp 2, dp 1), on 2 dedicated nodes (4 per node, --base-gpu-id 0 2 4 6, ports 30000-30003)" in text
    assert "on the first of them (port 29000)" in text
    assert "trainer sends every request to it" in plan("rollout.engine_tp=8", "cluster.nodes=1").describe()[0]

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert "behind sglang-router not installed (round_robin)" in plan().describe()[0]


def test_rl_dry_run_prints_the_fleet_and_the_clamp():
    r = subprocess.run([sys.executable, "-m", "megatron_ring.cli", "rl", "recipes/ling_lite/rl_stage1_math.yaml", "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\n# rollout fleet: 128 SGLang engines (--tp 2, dp 1), colocated on the 32 training nodes" in r.stdout
    assert "behind sglang-router" in r.stdout and "the trainer sends every request to the router" in r.stdout
    assert "\n# max_new_tokens 24576 clamped per request to min(24576, 32768 - prompt - 1)\n" in r.stdout
