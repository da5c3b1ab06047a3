"""tests/sglang_test_server.py as one engine of a fleet's weight sync, over plain HTTP against a
trainer built here: --tp 2 ranks in the trainer's group (a flattened bucket, per-tensor
broadcasts), tensors through shared memory, /get_weights_by_name, the memory saver and the
begin/end session, /events; the synthetic mode taking part in a push (in process)."""

import base64
import dataclasses
import io
import json
import pickle
import sys
import types
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tests.sglang_test_server as ts
from megatron_ring.platform.distributed import free_port
from megatron_ring.rollout.sglang_server import launch
from tests.test_sglang_client import TEST_SERVER

NORM, HEAD, EMBED = "model.norm.weight", "lm_head.weight", "model.word_embeddings.weight"
SESSION = "must run between begin_weight_update() and end_weight_update()"


def call(url, path, body=None, method="POST"):
    """(status, parsed JSON answer); a GET may carry a JSON body, as SGLang's do."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    return status, json.loads(raw) if raw.strip() else None


def weights(url, name, truncate=100):
    status, answer = call(url, "/get_weights_by_name", {"name": name, "truncate_size": truncate}, "GET")
    assert status == 200, answer
    return answer


def join(post, port, world, group):
    """Group rank 0, as the trainer builds it (megatron_ring's _group_store), while `post` asks
    the engine to join; -> the trainer's process group."""
    with ThreadPoolExecutor(1) as ex:
        answer = ex.submit(post, {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1,
                                  "world_size": world, "group_name": group, "backend": "gloo"})
        timeout = timedelta(seconds=60)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=True, timeout=timeout, wait_for_workers=False)
        for prefix in (group, f"{group}/", "cpu/"):
            store = dist.PrefixStore(prefix, store)
        pg = dist.ProcessGroupGloo(store, 0, world, timeout)
        pg._set_sequence_number_for_group()
        assert answer.result(60)[0] == 200, answer.result()
    return pg


def push(post, pg, tensors, body):
    """Broadcast `tensors` from group rank 0 while `post(body)` receives them; -> its answer."""
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    with ThreadPoolExecutor(1) as ex:
        answer = ex.submit(post, body)
        for t in tensors:
            pg.broadcast([t], opts).wait()
        return answer.result(60)


def flat(named):
    """SGLang's FlattenedTensorBucket: the tensors' bytes back to back, and their metadata."""
    metadata, start = [], 0
    for name, t in named:
        n = t.numel() * t.element_size()
        metadata.append(types.SimpleNamespace(name=name, shape=t.shape, dtype=t.dtype, start_idx=start,
                                              end_idx=start + n, numel=n))
        start += n
    return torch.cat([t.flatten().view(torch.uint8) for _, t in named]), metadata


def serialize(obj) -> str:
    """SGLang's MultiprocessingSerializer.serialize(obj, output_str=True)."""
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def engine(tiny_hf, tmp_path_factory):
    server = launch(tiny_hf, tmp_path_factory.mktemp("tp2") / "log", free_port(), tp=2, command=TEST_SERVER,
                    extra_args=["--enable-memory-saver"], ready_timeout_s=60)
    yield server.url
    server.stop()


def test_tp2_engine_joins_a_world_of_3_and_receives_buckets(engine):
    post = lambda path: lambda body: call(engine, path, body)
    pg = join(post("/init_weights_update_group"), free_port(), 3, "g")
    norm, head = torch.randn(128).bfloat16(), torch.randn(1000, 128)
    assert call(engine, "/begin_weight_update") == (200, {"success": True, "message": "Success"})
    status, answer = call(engine, "/update_weights_from_distributed", {  # refused before any broadcast
        "names": ["a", "b"], "dtypes": ["bfloat16", "float32"], "shapes": [[3], [2]], "group_name": "g",
        "load_format": "flattened_bucket"})
    assert status == 400 and "Unaligned received tensor b: byte offset 6, dtype torch.float32" in answer["message"]
    bucket, _ = flat([(NORM, norm), (HEAD, head)])
    body = {"names": [NORM, HEAD], "dtypes": ["bfloat16", "float32"], "shapes": [[128], [1000, 128]],
            "group_name": "g", "flush_cache": True, "weight_version": "3", "load_format": "flattened_bucket"}
    assert push(post("/update_weights_from_distributed"), pg, [bucket], body) == (200, {
        "success": True, "message": "Succeeded to update parameter online. Weight version updated to 3."})
    embed = torch.randn(1000, 128)
    body = {"names": [EMBED], "dtypes": ["float32"], "shapes": [[1000, 128]], "group_name": "g"}
    assert push(post("/update_weights_from_distributed"), pg, [embed], body)[0] == 200  # one broadcast per tensor
    assert call(engine, "/end_weight_update")[0] == 200
    assert weights(engine, NORM, truncate=128) == norm.float().tolist()
    assert weights(engine, HEAD, truncate=3) == head[:3].tolist()
    assert weights(engine, EMBED, truncate=2) == embed[:2].tolist()
    assert call(engine, "/get_weights_by_name", {"name": "nope"}) == (400, {"error": {"message": "Get parameter by name failed"}})
    info = call(engine, "/model_info", method="GET")[1]
    assert info["weight_version"] == "3" and info["tp_size"] == 2
    assert call(engine, "/destroy_weights_update_group", {"group_name": "g"})[0] == 200
    assert call(engine, "/destroy_weights_update_group", {"group_name": "g"})[0] == 400


def test_tensor_push_through_shared_memory(engine, monkeypatch):
    strategy = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")  # CPU tensors travel as shared-memory file names
    try:
        head = torch.randn(1000, 128)
        entry = lambda: serialize([(HEAD, head)])  # a payload is read once: one per rank and call
        assert call(engine, "/begin_weight_update")[0] == 200
        status, answer = call(engine, "/update_weights_from_tensor", {"serialized_named_tensors": [entry()]})
        assert status == 400 and "1 serialized_named_tensors for 2 TP ranks" in answer["message"]
        body = {"serialized_named_tensors": [entry(), entry()], "load_format": None, "weight_version": "4"}
        assert call(engine, "/update_weights_from_tensor", body) == (200, {
            "success": True, "message": "Success Weight version updated to 4."})
        sent = head[:2].tolist()
        head.zero_()  # the trainer reuses its buffer once answered: the server kept a copy
        assert weights(engine, HEAD, truncate=2) == sent

        norm = torch.randn(128)  # a bucket whose metadata are SGLang's own class
        module = types.ModuleType("sglang.srt.weight_sync.tensor_bucket")
        meta = dataclasses.make_dataclass("FlattenedTensorMetadata", ["name", "shape", "dtype", "start_idx",
                                                                     "end_idx", "numel"])
        meta.__module__, module.FlattenedTensorMetadata = module.__name__, meta
        monkeypatch.setitem(sys.modules, "sglang", types.ModuleType("sglang"))
        monkeypatch.setitem(sys.modules, module.__name__, module)
        bucket, metadata = flat([(NORM, norm), (EMBED, torch.randn(1000, 128).bfloat16())])
        payload = {"flattened_tensor": bucket, "metadata": [meta(**vars(m)) for m in metadata]}
        body = {"serialized_named_tensors": [serialize(payload), serialize(payload)], "load_format": "flattened_bucket"}
        assert call(engine, "/update_weights_from_tensor", body)[0] == 200
        assert weights(engine, NORM) == norm[:100].tolist()  # truncate_size defaults to 100

        other = serialize([(HEAD, torch.ones(1000, 128))])
        status, answer = call(engine, "/update_weights_from_tensor", {"serialized_named_tensors": [entry(), other]})
        assert status == 400 and "TP rank 1 received a different lm_head.weight than TP rank 0" in answer["message"]
        evil = base64.b64encode(pickle.dumps([(HEAD, Evil())])).decode()
        status, answer = call(engine, "/update_weights_from_tensor", {"serialized_named_tensors": [evil, evil]})
        assert status == 400 and "Blocked unsafe global (builtins.print) during pickle deserialization" in answer["message"]
        status, answer = call(engine, "/update_weights_from_tensor", {"serialized_named_tensors": ["@@", "@@"]})
        assert status == 400 and "serialized_named_tensors[0]" in answer["message"]
        assert weights(engine, HEAD, truncate=2) == sent  # refused pushes changed nothing
        assert call(engine, "/end_weight_update")[0] == 200
        assert call(engine, "/generate", {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}})[0] == 200
    finally:
        mp.set_sharing_strategy(strategy)


class Evil:
    def __reduce__(self):
        return print, ("unpickled a global outside the allowlist",)


def test_memory_saver_refusals_and_events(engine, tiny_hf):
    gen = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}
    start = len(call(engine, "/events", method="GET")[1])
    assert call(engine, "/generate", gen)[0] == 200
    assert call(engine, "/release_memory_occupation", {"tags": ["kv_cache"]}) == (200, None)
    status, answer = call(engine, "/generate", gen)
    assert status == 400 and "kv_cache released" in answer["error"]["message"]
    assert call(engine, "/release_memory_occupation", {"tags": ["kv_cache"]})[0] == 400  # already
    assert call(engine, "/release_memory_occupation", {"tags": ["weights"]})[0] == 200
    assert call(engine, "/begin_weight_update")[0] == 200
    released = "weights are released; resume_memory_occupation(['weights']) first"
    for path, body in (("/update_weights_from_disk", {"model_path": str(tiny_hf)}),
                       ("/update_weights_from_tensor", {"serialized_named_tensors": ["", ""]}),
                       ("/update_weights_from_distributed", {"names": [], "dtypes": [], "shapes": []})):
        status, answer = call(engine, path, body)
        assert status == 400 and released in answer["message"], (path, answer)
    assert call(engine, "/end_weight_update")[0] == 200
    assert call(engine, "/resume_memory_occupation", {"tags": ["cuda_graph"]})[0] == 400  # not released
    assert call(engine, "/resume_memory_occupation", {"tags": ["weights", "kv_cache"]}) == (200, None)
    assert call(engine, "/generate", gen)[0] == 200
    assert call(engine, "/update_weights_from_disk", {"model_path": str(tiny_hf), "weight_version": "9"})[0] == 200
    assert call(engine, "/release_memory_occupation", {"tags": None})[0] == 200  # None: all
    assert call(engine, "/resume_memory_occupation", {})[0] == 200
    events = call(engine, "/events", method="GET")[1][start:]
    g = events[0]["generated"]
    assert g >= 1 and events == [
        {"op": "release", "tags": ["kv_cache"], "generated": g},
        {"op": "release", "tags": ["weights"], "generated": g},
        {"op": "begin_weight_update", "generated": g},
        {"op": "end_weight_update", "generated": g},
        {"op": "resume", "tags": ["weights", "kv_cache"], "generated": g},
        {"op": "weights_updated", "kind": "disk", "version": "9", "generated": g + 1},
        {"op": "release", "tags": ["kv_cache", "weights", "cuda_graph"], "generated": g + 1},
        {"op": "resume", "tags": ["kv_cache", "weights", "cuda_graph"], "generated": g + 1}]


def test_updates_outside_begin_end_are_refused(engine):
    for path, body in (("/update_weights_from_distributed", {"names": [NORM], "dtypes": ["float32"], "shapes": [[128]]}),
                       ("/update_weights_from_tensor", {"serialized_named_tensors": ["", ""]})):
        assert call(engine, path, body) == (400, {"success": False, "message": f"{path[1:]} {SESSION}"})
    assert call(engine, "/end_weight_update") == (400, {
        "success": False, "message": "no weight-update session is open; call begin_weight_update() first"})
    assert call(engine, "/begin_weight_update")[0] == 200
    assert call(engine, "/begin_weight_update")[0] == 400  # one session at a time
    assert call(engine, "/end_weight_update")[0] == 200


def test_synthetic_engines_take_part_in_a_push_and_flags(tiny_hf):
    """In process: a synthetic --tp 2 engine joins and receives (then drops) a bucket; without
    --enable-memory-saver and with --no-weights-by-name the endpoints answer 400."""
    state = ts.State(ts.SyntheticModel("/models/syn", 1000, 1, 20.0, 0.5), 4096, tp=2)
    post = lambda path: lambda body: ts.handle(state, "POST", path, body)
    pg = join(post("/init_weights_update_group"), free_port(), 3, "syn")
    bucket, _ = flat([(NORM, torch.randn(128))])
    body = {"names": [NORM], "dtypes": ["float32"], "shapes": [[128]], "group_name": "syn",
            "weight_version": "5", "load_format": "flattened_bucket"}
    assert post("/begin_weight_update")({})[0] == 200
    assert push(post("/update_weights_from_distributed"), pg, [bucket], body)[0] == 200
    assert post("/end_weight_update")({})[0] == 200
    assert state.model.weight_version == "5"
    assert [e["op"] for e in state.events] == ["begin_weight_update", "weights_updated", "end_weight_update"]
    assert post("/destroy_weights_update_group")({"group_name": "syn"})[0] == 200
    refused = (400, {"error": {"message": "Get parameter by name failed"}})
    assert ts.handle(state, "GET", "/get_weights_by_name", {"name": NORM}) == refused
    ling = ts.State(ts.Model(str(tiny_hf), "auto"), 4096, weights_by_name=False)
    assert ts.handle(ling, "POST", "/get_weights_by_name", {"name": NORM}) == refused
    with pytest.raises(ts.BadRequest, match="memory saver is off.*--enable-memory-saver"):
        ts.handle(ling, "POST", "/release_memory_occupation", {"tags": ["weights"]})
