"""Under torchrun (2 ranks, TP1/EP2: experts are gathered before they are sent), pushes through
SGLangEngine to SGLang-protocol test servers (fp32 serving, so a bf16 push is served exactly):

distributed: three engines started here (--tp 1, 2, 1: a world of 1 + 4 ranks) receive a push
    over one gloo group; then engine 1 is armed to exit after its first bucket, the next push
    fails naming it, and after its restart on the same port the push after that succeeds.
tensor: one colocated engine of --tp 2 started by Fleet.start with the memory saver: rank r
    feeds its TP rank r through shared memory; release, push, and the events the engine saw.
probe: an engine without get_weights_by_name: the push is verified by the logprob probe, which
    also catches the engine serving other weights.

Rank 0 writes out/result.json: per push, each engine's samples, weight_version and what the push
reported; the error of the interrupted push as every rank saw it."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.models.builder import build_model
from megatron_ring.models.hf_checkpoint import HFReader
from megatron_ring.models.weights import load_hf
from megatron_ring.platform import distributed
from megatron_ring.rollout import weight_check
from megatron_ring.rollout.base import RolloutError
from megatron_ring.rollout.fleet import Fleet
from megatron_ring.rollout.fleet_plan import FleetPlan
from megatron_ring.rollout.sglang_client import SGLangClient
from megatron_ring.rollout.sglang_engine import SGLangEngine
from megatron_ring.rollout.sglang_server import SGLangServer, server_argv
from megatron_ring.rollout.tensor_push import TensorPush
from megatron_ring.rollout.weight_sync import WeightGroup
from tests.test_sglang_client import PROMPTS, TEST_SERVER

PARAMS = SamplingParams(max_new_tokens=4, seed=3)
BUCKET = 200_000  # bytes: a push is several buckets


def samples(urls: list[str]) -> dict:
    """Rank 0: each engine's samples of PROMPTS (the same seeds) and its weight version."""
    out = {}
    for u in urls:
        client = SGLangClient(u)
        out[u] = {"samples": [[(c.tokens, c.logprobs) for c in s] for s in client.generate(PROMPTS, 2, PARAMS, [0, 1, 2])],
                  "version": client.model_info()["weight_version"]}
    return out


def start(hf, tp: int, log: Path, port: int | None = None, by_name: bool = True) -> SGLangServer:
    port = port or distributed.free_port()
    args = ["--dtype", "float32", *([] if by_name else ["--no-weights-by-name"])]
    server = SGLangServer(server_argv(hf, "127.0.0.1", port, tp=tp, extra_args=args, command=TEST_SERVER),
                          "127.0.0.1", port, log)
    server.wait_ready(120)
    return server


def distributed_push(model, served_hf, out: Path, result: dict) -> None:
    servers = []
    if distributed.is_rank0():
        servers = [start(served_hf, tp, out / f"engine{j}.log") for j, tp in enumerate((1, 2, 1))]
    urls = distributed.rank0_then_broadcast(lambda: [s.url for s in servers])
    sync = WeightGroup([(u, tp) for u, tp in zip(urls, (1, 2, 1))], "127.0.0.1", timeout_s=60) \
        if distributed.is_rank0() else None
    engine = SGLangEngine(SGLangClient(urls[0]), fleet=Fleet(urls[0], urls, servers), weight_mode="distributed",
                          sync=sync, weights_dir=out / "unused", bucket_bytes=BUCKET, verify_tensors=4)
    try:
        engine.push_weights(model, 5)
        result["pushed"] = {"push": engine.last_push, "engines": distributed.rank0_then_broadcast(lambda: samples(urls)),
                            "world": sync and sync.world_size}
        distributed.rank0_then_broadcast(lambda: SGLangClient(urls[1]).post("/test_exit_after_buckets", {"n": 1}))
        try:
            engine.push_weights(model, 6)
        except RolloutError as e:
            result[f"interrupted_rank{dist.get_rank()}"] = str(e)

        def restart():
            servers[1].stop()
            servers[1] = start(served_hf, 2, out / "engine1_restarted.log", port=int(urls[1].rsplit(":", 1)[1]))

        distributed.rank0_then_broadcast(restart)
        engine.push_weights(model, 7)
        result["after_restart"] = {"push": engine.last_push, "generation": sync and sync.generation,
                                   "engines": distributed.rank0_then_broadcast(lambda: samples(urls))}
    finally:
        engine.close()


def tensor_push(model, served_hf, out: Path, result: dict) -> None:
    plan = FleetPlan(url=None, placement="colocated", engine_tp=2, engines=1, engines_per_node=1, hosts=1,
                     base_gpu_ids=[0], router=False, context_length=4096,
                     server_args=["--tp", "2", "--dtype", "float32", "--enable-memory-saver"])
    fleet = Fleet.start(plan, served_hf, out / "colocated", command=TEST_SERVER, ready_timeout_s=120)
    engine = SGLangEngine(SGLangClient(fleet.url), fleet=fleet, weight_mode="tensor",
                          sync=TensorPush(fleet.engines, 2, 1), weights_dir=out / "unused", bucket_bytes=BUCKET,
                          verify_tensors=4, memory_saver=True)
    try:
        engine.release_memory()
        engine.push_weights(model, 8)
        result["tensor"] = {"push": engine.last_push, "engines": distributed.rank0_then_broadcast(lambda: samples(fleet.engines)),
                            "events": distributed.rank0_then_broadcast(
                                lambda: SGLangClient(fleet.engines[0]).request("GET", "/events"))}
    finally:
        engine.close()


def probe(model, served_hf, out: Path, result: dict) -> None:
    """An engine that cannot answer by name (as SGLang's BailingMoe): verified by the logprob
    probe; then the engine is given other weights behind the trainer's back, and the probe says so."""
    server = start(served_hf, 1, out / "probe.log", by_name=False) if distributed.is_rank0() else None
    url = distributed.rank0_then_broadcast(lambda: server.url)
    sync = WeightGroup([(url, 1)], "127.0.0.1", timeout_s=60) if distributed.is_rank0() else None
    engine = SGLangEngine(SGLangClient(url), fleet=Fleet(url, [url], [server] if server else []),
                          weight_mode="distributed", sync=sync, weights_dir=out / "unused", verify_tensors=2)
    try:
        result["probe"] = engine.push_weights(model, 4)
        distributed.rank0_then_broadcast(lambda: SGLangClient(url).update_weights_from_disk(served_hf, 4))
        try:
            weight_check.verify(model, [url], {"lm_head.weight": None}, 4)
        except RolloutError as e:
            result[f"probe_error_rank{dist.get_rank()}"] = str(e)
    finally:
        engine.close()


def main(mode: str, served_hf: str, pushed_hf: str, out: str) -> None:
    layout = distributed.init(1, 2)
    arch = HFReader(pushed_hf).arch
    model = build_model(arch, layout.validate(arch))
    load_hf(model, HFReader(pushed_hf))
    out, result = Path(out), {}
    {"distributed": distributed_push, "tensor": tensor_push, "probe": probe}[mode](model, served_hf, out, result)
    everyone = distributed.everyone(result)
    if distributed.is_rank0():
        merged = {k: v for r in reversed(everyone) for k, v in r.items()}  # rank 0 wins, rank 1 adds its own keys
        (out / "result.json").write_text(json.dumps(merged))
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
