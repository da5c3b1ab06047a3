"""Weight pushes to an engine fleet, trainer on 2 gloo ranks (tests/workers/weight_push.py): one
distributed group to three engines (one of 2 TP ranks), a push cut by an engine's death and the
one after its restart; the colocated push through shared memory with the memory saver. Every
engine must then sample what the pushed weights give (the plain-PyTorch reference forward of the
bf16 values), and each push is verified by reading tensors back."""

import pytest
import torch

from megatron_ring.rollout.weight_buckets import Bucket, sample_names
from tests.conftest import read_json, run_workers, write_random_hf
from tests.test_sglang_client import PROMPTS, read_hf, reference_logprobs

pytestmark = pytest.mark.slow  # torchrun, 2 processes and engines


def assert_serve(engines: dict, weights, version: str) -> None:
    """Every engine answers the same seeds identically, with the logprobs of `weights`."""
    config, sd = weights
    first = next(iter(engines.values()))["samples"]
    for url, got in engines.items():
        assert got["version"] == version, url
        assert got["samples"] == first, url  # the same weights everywhere
    for prompt, group in zip(PROMPTS, first):
        for tokens, logprobs in group:
            ref = reference_logprobs(sd, config, prompt, tokens, 1.0)
            torch.testing.assert_close(torch.tensor(logprobs), ref, rtol=0, atol=2e-4)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_arch):
    path = write_random_hf(tmp_path_factory.mktemp("pushed"), tiny_arch, seed=11)
    config, sd = read_hf(path)
    return path, (config, {k: v.bfloat16().float() for k, v in sd.items()})  # what a bf16 push serves


def test_distributed_push_to_three_engines_and_after_a_death(weights, tiny_hf, tmp_path):
    path, served = weights
    run_workers("weight_push", 2, "distributed", tiny_hf, path, tmp_path, timeout=600)
    r = read_json(tmp_path / "result.json")
    assert r["pushed"]["world"] == 1 + 1 + 2 + 1  # rank 0 and every engine's TP ranks
    assert r["pushed"]["push"]["push_verified"] == "by_name"
    assert r["pushed"]["push"]["push_bytes"] == sum(t.numel() * 2 for t in served[1].values())
    assert_serve(r["pushed"]["engines"], served, "5")
    # The push cut by engine 1's death fails on both ranks, naming it.
    for rank in (0, 1):
        assert "weight" in r[f"interrupted_rank{rank}"] and ":" in r[f"interrupted_rank{rank}"]
    restarted_url = list(r["pushed"]["engines"])[1]
    assert restarted_url in r["interrupted_rank0"]
    assert r["after_restart"]["generation"] == 2  # a new group, built at the next push
    assert r["after_restart"]["push"]["push_verified"] == "by_name"
    assert_serve(r["after_restart"]["engines"], served, "7")


def test_colocated_push_through_shared_memory(weights, tiny_hf, tmp_path):
    path, served = weights
    run_workers("weight_push", 2, "tensor", tiny_hf, path, tmp_path, timeout=600)
    r = read_json(tmp_path / "result.json")["tensor"]
    assert r["push"]["push_verified"] == "by_name"
    assert_serve(r["engines"], served, "8")
    ops = [(e["op"], tuple(e.get("tags") or ())) for e in r["events"] if e["op"] in ("release", "resume", "weights_updated")]
    # The KV cache comes back only after the weights are in (the push's buffers never meet it).
    assert ops[0] == ("release", ("kv_cache", "weights"))
    assert ops[1] == ("resume", ("weights",))
    assert {op for op, _ in ops[2:-1]} == {"weights_updated"} and len(ops) > 3
    assert ops[-1] == ("resume", ("kv_cache",))
    assert all(e.get("kind", "tensor") == "tensor" for e in r["events"] if e["op"] == "weights_updated")


def test_logprob_probe_where_the_engine_cannot_answer_by_name(weights, tiny_hf, tmp_path):
    path, _ = weights
    run_workers("weight_push", 2, "probe", tiny_hf, path, tmp_path, timeout=600)
    r = read_json(tmp_path / "result.json")
    assert r["probe"]["push_verified"] == "probe"
    for rank in (0, 1):  # other weights served: every rank hears it, with the gap in nats
        assert "greedy logprobs differ from the trainer's by" in r[f"probe_error_rank{rank}"]


def test_bucket_layout_is_sglangs():
    """Tensors back to back in one uint8 tensor, offsets a multiple of each dtype's size, views
    that give the tensors back; the metadata has FlattenedTensorMetadata's fields."""
    named = [("a", torch.arange(6, dtype=torch.bfloat16).view(2, 3)), ("b", torch.ones(3, dtype=torch.bfloat16))]
    b = Bucket.of(named)
    assert b.nbytes == 18 and b.flat.dtype == torch.uint8
    assert [(m.name, m.start_idx, m.end_idx, m.numel, tuple(m.shape)) for m in b.metadata()] == \
        [("a", 0, 12, 12, (2, 3)), ("b", 12, 18, 6, (3,))]
    for (n, t), (m, v) in zip(named, b.tensors()):
        assert n == m and torch.equal(t, v)


def test_sampled_names_vary_and_keep_the_ends():
    names = [f"t{i}" for i in range(50)]
    a, b = sample_names(names, 4, 1), sample_names(names, 4, 2)
    assert a[:2] == b[:2] == ["t0", "t49"] and len(set(a)) == 4 and a != b
    assert sample_names(names, 0, 1) == []
