"""Routed experts from SGLang (rollout/routed_experts.py): the codec of meta_info.routed_experts,
the clients asking for them only when told, the test server's report checked against the
routers of a plain-PyTorch forward, and the fleet plan's server flag."""

import base64
import subprocess
from unittest import mock

import numpy as np
import pytest
import torch

import tests.sglang_test_server as ts
from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.models.router_replay import UNKNOWN
from megatron_ring.platform.distributed import free_port
from megatron_ring.recipe import load_recipe
from megatron_ring.rollout.base import RolloutError
from megatron_ring.rollout.fleet_client import FleetClient
from megatron_ring.rollout.fleet_plan import FleetPlan
from megatron_ring.rollout.routed_experts import RoutingSpec, decode, encode
from megatron_ring.rollout.sglang_client import SGLangClient, generate_body, parse_generate
from megatron_ring.rollout.sglang_engine import SGLangEngine
from megatron_ring.rollout.sglang_server import launch
from tests.conftest import ROOT
from tests.hf_reference import hf_forward
from tests.test_sglang_client import PROMPTS, TEST_SERVER, FakeServer, read_hf

WHERE = "http://x/generate: result[0]"
FLAG = "--enable-return-routed-experts"


# -- the codec ---------------------------------------------------------------------------------

def test_round_trip_and_unreported_positions():
    ids = np.random.default_rng(0).integers(0, 64, (4 + 3 - 1, 5, 6))
    out = decode(encode(ids), 4, 3, 5, 6, WHERE)
    assert out.dtype == np.uint8 and out.shape == (6, 5, 6) and (out == ids).all()
    # SGLang's form: base64 of little-endian int32, C order.
    assert np.frombuffer(base64.b64decode(encode(ids)), "<i4").tolist() == ids.reshape(-1).tolist()
    # routed_experts_start_len 2: the first two positions were not reported.
    late = decode(encode(ids[2:]), 4, 3, 5, 6, WHERE, start=2)
    assert (late[:2] == UNKNOWN).all() and (late[2:] == ids[2:]).all()
    assert decode(encode(np.zeros((0, 5, 6))), 1, 0, 5, 6, WHERE).shape == (0, 5, 6)  # nothing read


@pytest.mark.parametrize("value, message", [
    (None, "is NoneType, expected a base64 string"),
    ([1, 2], "is list, expected a base64 string"),
    ("not base64!", "is not base64"),
    (encode(np.zeros((5, 2, 2))), r"holds 80 bytes, expected 4 positions x 2 layers x top-2 int32 = 64"),
    (encode(np.full((4, 2, 2), 255)), "holds expert id 255, expected 0 <= id < 255"),
    (encode(np.full((4, 2, 2), -1)), "holds expert id -1"),
], ids=["none", "list", "bad base64", "one row too many", "id 255", "id -1"])
def test_malformed_routed_experts_name_url_and_field(value, message):
    with pytest.raises(RolloutError, match=rf"^http://x/generate: result\[0\]: field meta_info.routed_experts {message}"):
        decode(value, 3, 2, 2, 2, WHERE)


def answer(prompt_len, tokens, routed=None):
    meta = {"finish_reason": {"type": "length", "length": len(tokens)},
            "output_token_logprobs": [[-1.0, t, None] for t in tokens]}
    if routed is not None:
        meta["routed_experts"] = routed
    return {"text": "", "output_ids": list(tokens), "meta_info": meta}


def test_parse_only_when_asked():
    spec, ids = RoutingSpec(2, 2), np.arange(4 * 2 * 2).reshape(4, 2, 2) % 8
    item = answer(3, [7, 8], encode(ids))
    assert parse_generate([item], 1, "http://x/generate")[0].routing is None
    [c] = parse_generate([item], 1, "http://x/generate", spec, [3])
    assert (c.routing == ids).all()
    with pytest.raises(RolloutError, match=r"result\[0\]: missing field meta_info.routed_experts .*"
                                           "--enable-return-routed-experts"):
        parse_generate([answer(3, [7, 8])], 1, "http://x/generate", spec, [3])
    with pytest.raises(RolloutError, match=r"result\[0\]: field meta_info.routed_experts holds 64 bytes"):
        parse_generate([item], 1, "http://x/generate", spec, [2])  # placed at another prompt length


def routed_answer(body: dict) -> dict:
    """A /generate answer of tokens [4, 5] with routed experts of the right size (ids =
    position % 8) when the request asks for them."""
    rows = len(body["input_ids"]) + 2 - 1
    ids = np.broadcast_to((np.arange(rows) % 8)[:, None, None], (rows, 3, 2))
    return answer(len(body["input_ids"]), [4, 5], encode(ids) if body.get("return_routed_experts") else None)


def test_requests_carry_the_field_only_when_asked():
    params = SamplingParams(max_new_tokens=2)
    assert "return_routed_experts" not in generate_body(PROMPTS, 2, params, None, None)
    assert generate_body(PROMPTS, 2, params, None, None, True)["return_routed_experts"] is True
    rec = FakeServer([(200, routed_answer)])
    try:
        plain = FleetClient(rec.url).generate(PROMPTS, 2, params, keys=[0, 1, 2])
        assert all(c.routing is None for g in plain for c in g)
        assert all("return_routed_experts" not in b for b in rec.bodies) and len(rec.bodies) == 6
        rec.bodies.clear()
        spec = RoutingSpec(3, 2)
        routed = FleetClient(rec.url, routing=spec, context_length=5).generate(PROMPTS, 2, params, keys=[0, 1, 2])
        assert all(b["return_routed_experts"] is True for b in rec.bodies) and len(rec.bodies) == 4
        for prompt, group in zip(PROMPTS, routed):
            for c in group:
                if len(prompt) + 1 >= 5:  # no room in the context: skipped, nothing was read
                    assert c.tokens == [] and c.routing.shape == (len(prompt) - 1, 3, 2) and (c.routing == UNKNOWN).all()
                else:
                    assert c.routing.shape == (len(prompt) + 1, 3, 2)
                    assert (c.routing[:, 0, 0] == np.arange(len(prompt) + 1) % 8).all()
    finally:
        rec.close()


# -- the test server's routers against a plain-PyTorch forward -----------------------------------

def reference_routing(sd, config, ids) -> np.ndarray:
    """[len(ids), layers, top_k]: what each MoE layer's router (hf_reference's torch.topk, one
    call per layer) chose in one forward over ids."""
    chosen, real = [], torch.topk

    def topk(*args, **kwargs):
        out = real(*args, **kwargs)
        chosen.append(out.indices)
        return out

    with mock.patch.object(torch, "topk", topk):
        hf_forward(sd, config, torch.tensor([ids]))
    return torch.stack(chosen, 1).numpy()


@pytest.fixture(scope="module")
def routed_server(tiny_hf, tmp_path_factory):
    log = tmp_path_factory.mktemp("routed") / "sglang_server.log"
    server = launch(tiny_hf, log, free_port(), command=TEST_SERVER, extra_args=[FLAG], ready_timeout_s=60)
    yield server
    server.stop()


def test_routing_is_the_reference_routers_top_k(routed_server, tiny_hf, tiny_arch, tmp_path):
    config, sd = read_hf(tiny_hf)
    spec = RoutingSpec(tiny_arch.num_layers, tiny_arch.moe_topk)
    params = SamplingParams(max_new_tokens=5, seed=4)
    batch = SGLangClient(routed_server.url).generate(PROMPTS, 2, params, keys=[0, 1, 2], routing=spec)
    # The engine's path: one request per sample through the FleetClient.
    engine = SGLangEngine.connect(routed_server.url, weights_dir=tmp_path / "w", routing=spec)
    fleet = engine.generate(PROMPTS, 2, params, keys=[0, 1, 2])
    for prompt, group, again in zip(PROMPTS, batch, fleet):
        for c, d in zip(group, again):
            assert c.tokens == d.tokens and (c.routing == d.routing).all()
            read = prompt + c.tokens[:-1]  # the last token is read by no forward
            assert c.routing.dtype == np.uint8 and c.routing.shape == (len(read), tiny_arch.num_layers, tiny_arch.moe_topk)
            ref = reference_routing(sd, config, read)
            assert (np.sort(c.routing, -1) == np.sort(ref, -1)).all()  # top-k as sets per (token, layer)
            if len(read) > 1:  # one position off would not pass
                assert not (np.sort(c.routing[1:], -1) == np.sort(ref[:-1], -1)).all()
    plain = SGLangClient(routed_server.url).generate(PROMPTS, 2, params, keys=[0, 1, 2])
    assert [[c.tokens for c in g] for g in plain] == [[c.tokens for c in g] for g in batch]
    assert all(c.routing is None for g in plain for c in g)


def test_without_the_server_flag_the_field_is_silently_absent(tiny_hf):
    """As SGLang 0.5.23: a request asking for routed experts gets none, and no error, from a
    server started without --enable-return-routed-experts (the client then says why)."""
    ts.import_torch()
    model = ts.Model(str(tiny_hf), "auto")
    body = {"input_ids": [[5, 17, 42]], "sampling_params": [{"max_new_tokens": 3, "sampling_seed": 1}],
            "return_logprob": True, "logprob_start_len": -1, "return_routed_experts": True}
    status, [item] = ts.handle(ts.State(model, 4096), "POST", "/generate", body)
    assert status == 200 and "routed_experts" not in item["meta_info"]
    with pytest.raises(RolloutError, match="missing field meta_info.routed_experts"):
        parse_generate([item], 1, "http://x/generate", RoutingSpec(3, 2), [3])
    flagged = ts.State(model, 4096, routed_experts=True)
    status, [item] = ts.handle(flagged, "POST", "/generate", {**body, "routed_experts_start_len": 2})
    [c] = parse_generate([item], 1, "http://x/generate")
    assert len(base64.b64decode(item["meta_info"]["routed_experts"])) == (3 + len(c.tokens) - 1 - 2) * 3 * 2 * 4
    with pytest.raises(ts.BadRequest, match="routed_experts_start_len=4 is higher than the number of input tokens"):
        ts.handle(flagged, "POST", "/generate", {**body, "routed_experts_start_len": 4})


# -- the fleet plan ---------------------------------------------------------------------------------

def plan(*sets):
    """The paper's stage-1 recipe, without routing replay unless `sets` ask for it."""
    return FleetPlan.of(load_recipe(ROOT / "recipes/ling_lite/rl_stage1_math.yaml", ["rl.router_replay='off'", *sets]))


@pytest.mark.parametrize("sets, wanted", [
    ((), False),
    (("rollout.routed_experts=true",), True),
    (("rl.router_replay=r3",), True),
    (("rollout.routed_experts=true", "rollout.server_args=[--dtype, bfloat16, --enable-return-routed-experts]"), True),
    (("cluster.sglang=dedicated", "cluster.sglang_nodes=2", "rl.router_replay=r3"), True),
])
def test_fleet_plan_adds_the_server_flag_exactly_when_wanted(sets, wanted):
    p = plan(*sets)
    assert p.server_args.count(FLAG) == int(wanted) and p.routed_experts == wanted
    assert (FLAG in p.engine_args(0)) == wanted
    text = "\n".join(p.describe())
    assert ("routed experts: every request asks" in text) == wanted and (FLAG in text) == wanted


def test_given_fleet_is_told_to_run_with_the_flag():
    p = plan("rollout.url=http://router:29000", "rollout.routed_experts=true")
    assert p.server_args == [] and f"the server must run with {FLAG}" in "\n".join(p.describe())


def test_synthetic_mode_refuses_the_flag():
    """A synthetic server has no router: it does not make routing up."""
    r = subprocess.run([*TEST_SERVER, "--model-path", "m", "--synthetic-vocab", "10", FLAG],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "synthetic mode has no router" in r.stderr
