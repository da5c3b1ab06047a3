"""A small stand-in for an SGLang server, for testing the client where SGLang cannot run.

    python tests/sglang_test_server.py --model-path HF_DIR --host 127.0.0.1 --port P

It serves a Ling model from an HF safetensors directory with the plain-PyTorch forward of
tests/hf_reference.py (no Megatron, no megatron_ring) and implements the request and response
fields of SGLang's native API that the notes record (/generate with input_ids and logprobs, the
weight-update endpoints, health). Pushed weights really replace the served ones, so a protocol
mistake in the client shows up as wrong logprobs, a 400 or a hang, not as a passing test:
- from disk (/update_weights_from_disk);
- by broadcast (/init_weights_update_group, /update_weights_from_distributed, between
  /begin_weight_update and /end_weight_update as SGLang 0.5.23 requires): the engine's --tp N
  ranks join the trainer's group as ranks rank_offset.. rank_offset+N-1, each from its own
  thread; TP rank 0 the way SGLang joins (tcp rendezvous on the trainer's store, group-name
  prefix, torch's own group helper), the others on the same store prefixes built by hand (one
  process cannot register a group name twice), so wrong prefixes show up as a hang. Tensors come
  one broadcast each, or with load_format "flattened_bucket" as one uint8 broadcast laid out as
  SGLang's FlattenedTensorBucket.empty. Every TP rank must receive the same tensors;
- as serialized tensors (/update_weights_from_tensor): one base64 ForkingPickler payload per TP
  rank (SGLang's MultiprocessingSerializer), read with an allowlist unpickler modelled on
  SGLang's SafeUnpickler; CPU tensors travel as shared-memory files (the trainer's
  torch.multiprocessing sharing strategy "file_system") and are copied before the answer.
/get_weights_by_name answers a served tensor as SGLang's llama does (first truncate_size rows,
as floats); --no-weights-by-name answers it as SGLang does for BailingMoeForCausalLM (Ling),
which has no get_weights_by_name. --enable-memory-saver models /release_memory_occupation and
/resume_memory_occupation by tags: only the released set is tracked (no memory is freed; weights
survive a release, as with a CPU backup), and /generate or a weight push meanwhile is refused.
GET /events (not an SGLang endpoint) lists memory and weight-update events in order, each with
the number of /generate requests answered so far, so tests can check what happened when (the
log has them too, as EVENT lines). Two more test-only endpoints: POST /test_exit_after_buckets
{n} makes the process exit after its n-th received bucket, before answering (an engine dying
mid-push); POST /bench_receive {group_name, numel} receives one raw broadcast of numel bytes on
every TP rank (what tools/bench_weight_sync.py measures a push against).

Routed experts (rollout routing replay): with --enable-return-routed-experts, a /generate
request with return_routed_experts true gets meta_info.routed_experts in SGLang 0.5.23's form
(megatron_ring/rollout/routed_experts.py has what the wheel says): base64 of int32 [rows,
num_hidden_layers, num_experts_per_tok], rows the positions [routed_experts_start_len,
prompt + output - 1), each the top-k the reference forward's router chose for that token in the
forward that read it (the prefill for prompt tokens, the decode step for an output token; the
last output token is read by none). The ids are taken from hf_reference's own torch.topk call
(RouterTap) and encoded here as SGLang's detokenizer does, not with megatron_ring's codec, so a
client that reads the form wrongly fails. Without the flag such a request gets no field and no
error, as in SGLang; a routed_experts_start_len outside [0, prompt] is refused with SGLang's 400.
Synthetic mode has no router to report: the flag is refused there at startup.

Synthetic mode (`--synthetic-vocab V`), for fleet and scheduling tests where the numbers do not
matter but lengths and timing do: no model is loaded (--model-path is only reported); every row
draws its length from a lognormal (median --synthetic-median-len, sigma --synthetic-len-sigma)
and its token ids in [2, V) and logprobs in [-5, 0) from random.Random(sampling_seed), so a seed
gives the same answer bit for bit, on any server of a fleet. Of the sampling parameters only
max_new_tokens, ignore_eos and sampling_seed (and n) count. A push from disk reads nothing: it
records the version and the path, as a real one would; distributed and tensor pushes are
received (and checked) like above, then dropped, so synthetic engines can take part in a fleet's
push; /get_weights_by_name is refused as with --no-weights-by-name.

Engine-like timing, both modes: --decode-latency-s D makes a request take max(row lengths) x D
seconds (rows of a request decode together, as in continuous batching; requests overlap), and
--max-running-requests R holds a request until its rows fit among the R running sequences (a
request with more rows than R runs alone). /server_info reports context_length (SGLang's
--context-length, default the config's max_position_embeddings) and /generate refuses rows that
do not fit in it with SGLang's 400 and wording. Each /generate result also carries
meta_info.model_path (not an SGLang field) so tests can tell which server of a fleet answered.
The real sglang-router registers it (/health, /server_info, /model_info; its HTTP/2 attempt is
answered 505 and it falls back to HTTP/1.1): tests/test_router.py.

Not modelled: KV cache, tokenizer/text, streaming, sharding over TP ranks (every TP rank holds
the full tensors and one forward serves them), CUDA IPC and SGLang's LocalSerializedTensor,
load formats other than "flattened_bucket", draft models (selector), abort_all_requests.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import pickle
import random
import signal
import sys
import threading
import time
import types
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

torch = dist = load_file = hf_forward = None  # imported by import_torch(): not in synthetic mode


def import_torch() -> None:
    """torch takes seconds to import; a synthetic server (of a fleet of them) does not need it."""
    global torch, dist, load_file, hf_forward, ROUTER_TAP
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import hf_reference

    hf_reference.torch = ROUTER_TAP = RouterTap(torch)
    hf_forward = hf_reference.hf_forward


class RouterTap:
    """hf_reference's `torch` (its alone): the same module, but torch.topk, which hf_reference
    calls once per MoE layer, for the router's choice, also hands the expert ids to the calling
    thread's open recording (requests are served on threads)."""

    def __init__(self, real):
        self.real, self.local = real, threading.local()

    def __getattr__(self, name):
        return getattr(self.real, name)

    def topk(self, *args, **kwargs):
        out = self.real.topk(*args, **kwargs)
        layers = getattr(self.local, "layers", None)
        if layers is not None:
            layers.append(out.indices)
        return out

    def forward(self, sd, config, ids, record: bool):
        """hf_forward's logits, and with record the routers' ids [positions, layers, top_k]."""
        self.local.layers = [] if record else None
        try:
            logits = hf_forward(sd, config, ids)
            return logits, torch.stack(self.local.layers, 1) if record else None
        finally:
            self.local.layers = None


ROUTER_TAP: RouterTap | None = None


GREEDY_BELOW = 1e-5  # SGLang samples greedily below this temperature


class BadRequest(Exception):
    pass


def load_hf_dir(path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise BadRequest(f"{path}: no config.json")
    config = json.loads((path / "config.json").read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise BadRequest(f"{path}: no *.safetensors files")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return config, sd


class Model:
    """The served weights; replaced only whole, under the lock, after validation."""

    ARCH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "vocab_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size")

    def __init__(self, model_path: str, dtype: str):
        self.config, sd = load_hf_dir(model_path)
        self.model_path = model_path
        self.dtype = None if dtype == "auto" else getattr(torch, dtype)
        self.sd = {k: v.to(self.dtype or v.dtype) for k, v in sd.items()}
        self.weight_version = "default"
        self.lock = threading.Lock()

    def check(self, named: dict[str, tuple]) -> None:
        """named: name -> shape. Refuse unknown, missing-shape or mis-shaped tensors."""
        for name, shape in named.items():
            if name not in self.sd:
                raise BadRequest(f"unknown tensor {name}")
            if tuple(shape) != tuple(self.sd[name].shape):
                raise BadRequest(f"{name} has shape {list(shape)}, served {list(self.sd[name].shape)}")

    def replace(self, tensors: dict[str, torch.Tensor], version, copy: bool = False) -> None:
        """copy: the tensors are the trainer's shared memory, reused after the answer."""
        new = {k: v.to(self.sd[k].dtype, copy=copy) for k, v in tensors.items()}
        with self.lock:
            self.sd = {**self.sd, **new}
            if version is not None:
                self.weight_version = str(version)

    def load_tensors(self, named: list[tuple[str, torch.Tensor]], version, copy: bool = False) -> None:
        self.check({k: v.shape for k, v in named})
        self.replace(dict(named), version, copy)

    def load_dir(self, path: str, version) -> None:
        config, sd = load_hf_dir(path)
        for key in self.ARCH_KEYS:
            if config.get(key) != self.config.get(key):
                raise BadRequest(f"{path}: {key}={config.get(key)} differs from the served model's {self.config.get(key)}")
        if set(sd) != set(self.sd):
            raise BadRequest(f"{path}: tensor names differ from the served model's: "
                             f"{sorted(set(sd) ^ set(self.sd))[:5]}")
        self.check({k: v.shape for k, v in sd.items()})
        self.replace(sd, version)
        self.model_path = path

    def sample(self, prompt: list[int], sp: dict, return_logprob: bool, routed_from: int | None = None) -> dict:
        """routed_from: also meta_info.routed_experts, of positions routed_from.. (SGLang's
        routed_experts_start_len)."""
        start = time.monotonic()
        vocab = self.config["vocab_size"]
        if not prompt or any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise BadRequest(f"input_ids must be a non-empty list of token ids below {vocab}")
        max_new = int(sp.get("max_new_tokens", 128))
        temperature = float(sp.get("temperature", 1.0))
        top_p = float(sp.get("top_p", 1.0))
        stops = set(sp.get("stop_token_ids") or [])
        if not sp.get("ignore_eos", False):
            stops.add(self.config.get("eos_token_id"))
        seed = sp.get("sampling_seed")
        gen = torch.Generator().manual_seed(int(seed) if seed is not None else torch.seed())
        with self.lock:
            sd, version = self.sd, self.weight_version
        seq, out, lps, routed = list(prompt), [], [], []
        finish = {"type": "length", "length": max_new}
        for _ in range(max_new):
            logits, experts = ROUTER_TAP.forward(sd, self.config, torch.tensor([seq]), routed_from is not None)
            logits = logits[0, -1]
            if experts is not None:  # the prefill routes every prompt token, a decode step its new one
                routed.append(experts if not routed else experts[-1:])
            if temperature < GREEDY_BELOW:
                logp = torch.log_softmax(logits, -1)
                tok = int(logits.argmax())
            else:
                logp = torch.log_softmax(logits / temperature, -1)
                p = logp.exp()
                if top_p < 1.0:
                    sp_sorted, order = p.sort(descending=True)
                    drop = sp_sorted.cumsum(-1) - sp_sorted >= top_p
                    p = torch.zeros_like(p).scatter(0, order, sp_sorted.masked_fill(drop, 0.0))
                tok = int(torch.multinomial(p, 1, generator=gen))
            out.append(tok)
            lps.append(float(logp[tok]))
            seq.append(tok)
            if tok in stops:
                finish = {"type": "stop", "matched": tok}
                break
        meta = {"id": uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": len(prompt),
                "completion_tokens": len(out), "cached_tokens": 0, "weight_version": version,
                "model_path": self.model_path, "e2e_latency": time.monotonic() - start}
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(lps, out)]
        if routed_from is not None and routed:  # as SGLang's detokenizer writes it
            ids = torch.cat(routed)[routed_from:].to(torch.int32)
            meta["routed_experts"] = base64.b64encode(ids.numpy().tobytes()).decode("utf-8")
        return {"text": "", "output_ids": out, "meta_info": meta}


class SyntheticModel:
    """Model's interface without a model: seeded random lengths, token ids and logprobs."""

    def __init__(self, model_path: str, vocab: int, eos: int, median_len: float, sigma: float):
        if vocab <= 2:
            raise ValueError("--synthetic-vocab must be > 2 (ids are drawn from [2, V))")
        self.config = {"vocab_size": vocab, "eos_token_id": eos}
        self.model_path, self.weight_version = model_path, "default"
        self.mu, self.sigma = math.log(median_len), sigma
        self.lock = threading.Lock()

    def load_dir(self, path: str, version) -> None:
        with self.lock:
            self.model_path = path
            if version is not None:
                self.weight_version = str(version)

    def load_tensors(self, named, version, copy: bool = False) -> None:
        """Received and dropped: there is nothing to serve them with."""
        with self.lock:
            if version is not None:
                self.weight_version = str(version)

    def sample(self, prompt: list[int], sp: dict, return_logprob: bool, routed_from: int | None = None) -> dict:
        """routed_from is always None: --enable-return-routed-experts is refused in synthetic mode."""
        start = time.monotonic()
        vocab, eos = self.config["vocab_size"], self.config["eos_token_id"]
        if not prompt or any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise BadRequest(f"input_ids must be a non-empty list of token ids below {vocab}")
        max_new = int(sp.get("max_new_tokens", 128))
        seed = sp.get("sampling_seed")
        rng = random.Random(int(seed) if seed is not None else None)
        # Drawn first and always, so the ids and logprobs of a seed do not depend on max_new.
        want = max(1, round(rng.lognormvariate(self.mu, self.sigma)))
        if sp.get("ignore_eos", False) or want >= max_new:  # SGLang checks length before eos
            n, finish = max_new, {"type": "length", "length": max_new}
        else:
            n, finish = want, {"type": "stop", "matched": eos}
        span, draw = vocab - 2, rng.random
        out, lps = [], []
        for _ in range(n):
            out.append(2 + int(draw() * span))
            lps.append((draw() - 1.0) * 5.0)
        if finish["type"] == "stop":
            out[-1] = eos
        with self.lock:
            version, path = self.weight_version, self.model_path
        meta = {"id": uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": len(prompt),
                "completion_tokens": n, "cached_tokens": 0, "weight_version": version,
                "model_path": path, "e2e_latency": time.monotonic() - start}
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(lps, out)]
        return {"text": "", "output_ids": out, "meta_info": meta}


def on_ranks(n: int, fn) -> list:
    """fn(tp_rank) for every TP rank, each in its own thread, as a collective needs them all at
    once; the first error is raised once every rank has returned."""
    results, errors = [None] * n, []

    def run(r):
        try:
            results[r] = fn(r)
        except Exception as e:  # noqa: BLE001 - raised below, in the request's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _sample(t: torch.Tensor) -> torch.Tensor:
    """At most ~64K evenly spaced elements: a wrong offset or a missed transfer shows in them, and
    comparing whole GB-sized buckets per TP rank would be most of a push's cost here."""
    flat = t.reshape(-1)
    return flat[::max(1, flat.numel() // 65536)]


def same_on_tp_ranks(per_rank: list[list]) -> list[tuple[str, torch.Tensor]]:
    """TP rank 0's (name, tensor) list, once every rank is seen to hold the same (sampled)."""
    first = per_rank[0]
    for r, got in enumerate(per_rank[1:], 1):
        if [n for n, _ in got] != [n for n, _ in first]:
            raise BadRequest(f"TP rank {r} received tensors {[n for n, _ in got][:5]}, TP rank 0 {[n for n, _ in first][:5]}")
        for (name, a), (_, b) in zip(first, got):
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(_sample(a), _sample(b)):
                raise BadRequest(f"TP rank {r} received a different {name} than TP rank 0")
    return first


def as_dtype(name) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise BadRequest(f"unknown dtype {name!r}")
    return dtype


class Record(types.SimpleNamespace):
    """sglang's FlattenedTensorMetadata and FlattenedTensorBucket in a payload (sglang is not
    installed here): their fields, by name."""


def bucket_layout(names, dtypes, shapes) -> tuple[list[Record], int]:
    """SGLang's FlattenedTensorBucket.empty: tensors back to back, byte offsets, each aligned to
    its dtype; -> (metadata, total bytes)."""
    metadata, offset = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        dtype, shape = as_dtype(dtype), torch.Size(shape)
        if any(dim < 0 for dim in shape):
            raise BadRequest(f"Negative dimension in received tensor {name}: {shape}")
        if offset % dtype.itemsize:
            raise BadRequest(f"Unaligned received tensor {name}: byte offset {offset}, dtype {dtype}")
        size = shape.numel() * dtype.itemsize
        metadata.append(Record(name=name, shape=shape, dtype=dtype, start_idx=offset,
                               end_idx=offset + size, numel=size))
        offset += size
    if not metadata:
        raise BadRequest("Cannot create empty tensor bucket")
    return metadata, offset


def reconstruct(flat: torch.Tensor, metadata) -> list[tuple[str, torch.Tensor]]:
    """SGLang's FlattenedTensorBucket.reconstruct_tensors: views into the flat uint8 tensor."""
    return [(m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)) for m in metadata]


class SafeUnpickler(pickle.Unpickler):
    """SGLang's allowlist (utils/common.py SafeUnpickler), in kind: containers, torch dtypes and
    the tensor and storage rebuilders of pickle and torch.multiprocessing, SGLang's bucket
    records; any other global is refused in SGLang's words."""

    ALLOWED = frozenset({("builtins", n) for n in ("bool", "bytearray", "bytes", "complex", "dict", "float",
                                         "frozenset", "int", "list", "range", "set", "slice", "str", "tuple")} | {
        ("collections", "OrderedDict"), ("collections", "defaultdict"), ("collections", "deque"),
        ("copyreg", "__newobj__"), ("copyreg", "__newobj_ex__"), ("types", "SimpleNamespace"),
        ("multiprocessing.resource_sharer", "DupFd"), ("torch", "Tensor"), ("torch", "Size"),
        ("torch", "device"), ("torch", "dtype"), ("torch.nn.parameter", "Parameter"),
        ("torch._tensor", "_rebuild_from_type_v2"), ("torch.storage", "UntypedStorage"),
        ("torch.storage", "TypedStorage")})
    SGLANG = frozenset({("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata"),
                        ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorBucket")})

    def find_class(self, module, name):
        if (module, name) in self.SGLANG:
            return Record
        if (module, name) == ("torch.storage", "_load_from_bytes"):  # torch's own is an unrestricted torch.load
            return lambda data: torch.load(io.BytesIO(data), weights_only=True)
        if ((module, name) in self.ALLOWED
                or module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype))
                or module == "torch._utils" and name.startswith("_rebuild_")
                or module == "torch.multiprocessing.reductions" and name.startswith("rebuild_")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Blocked unsafe global ({module}.{name}) during pickle deserialization")


def tensor_payload(entry: str, load_format) -> list[tuple[str, torch.Tensor]]:
    """One TP rank's entry of serialized_named_tensors -> (name, tensor) pairs."""
    obj = SafeUnpickler(io.BytesIO(base64.b64decode(entry, validate=True))).load()
    if load_format == "flattened_bucket":
        named = reconstruct(obj["flattened_tensor"], obj["metadata"])
    elif load_format is None:
        named = [(name, t) for name, t in obj]
    else:
        raise BadRequest(f"Unknown load_format={load_format}")
    for name, t in named:
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise BadRequest(f"expected (name, tensor) pairs, got ({type(name).__name__}, {type(t).__name__})")
    return named


class WeightGroup:
    """This engine's TP ranks (rank_offset.. rank_offset+tp-1) in the trainer's weight-update
    group, joined each from its own thread. TP rank 0 joins as SGLang does, through torch's group
    helper; the others cannot register the group's name again in this process, so they build the
    gloo group on the store prefixes the helper builds (group, group/, device/): were those wrong,
    they and rank 0 would not meet."""

    def __init__(self, body: dict, tp: int):
        self.name = body.get("group_name", "weight_update_group")
        self.world, self.offset = int(body["world_size"]), int(body["rank_offset"])
        self.host, self.port = body["master_address"], int(body["master_port"])
        self.backend = body.get("backend", "gloo")
        if tp > 1 and self.backend != "gloo":
            raise BadRequest(f"backend {self.backend!r}: the test server's TP ranks join with gloo only")
        self.timeout = timedelta(seconds=120)
        self.pgs = on_ranks(tp, self._join)

    def _join(self, tp_rank: int):
        rank = self.offset + tp_rank
        if tp_rank == 0:
            url = f"tcp://{self.host}:{self.port}"
            store, _, _ = next(dist.rendezvous(url, rank=rank, world_size=self.world, timeout=self.timeout))
            store.set_timeout(self.timeout)
            from torch.distributed.distributed_c10d import _new_process_group_helper, _world  # as SGLang does

            pg, _ = _new_process_group_helper(self.world, rank, [], self.backend,
                                              dist.PrefixStore(self.name, store),
                                              group_name=self.name, timeout=self.timeout)
            _world.pg_group_ranks[pg] = {r: r for r in range(self.world)}
            return pg
        store = dist.TCPStore(self.host, self.port, self.world, is_master=False, timeout=self.timeout)
        for prefix in (self.name, f"{self.name}/", "cpu/"):
            store = dist.PrefixStore(prefix, store)
        pg = dist.ProcessGroupGloo(store, rank, self.world, self.timeout)
        pg._set_sequence_number_for_group()  # the helper does this too: it reads rank 0's number
        return pg

    def receive(self, names, dtypes, shapes, load_format) -> list[tuple[str, torch.Tensor]]:
        """Every TP rank receives from group rank 0 (the trainer); refused unless all got the same."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        if load_format == "flattened_bucket":
            metadata, size = bucket_layout(names, dtypes, shapes)  # refused before any broadcast

            def one(r):
                flat = torch.empty(size, dtype=torch.uint8)
                self.pgs[r].broadcast([flat], opts).wait()
                return reconstruct(flat, metadata)
        elif load_format is None:
            if not len(names) == len(dtypes) == len(shapes):
                raise BadRequest(f"{len(names)} names, {len(dtypes)} dtypes, {len(shapes)} shapes")
            dtypes = [as_dtype(d) for d in dtypes]

            def one(r):
                out = []
                for name, dtype, shape in zip(names, dtypes, shapes):
                    t = torch.empty(shape, dtype=dtype)
                    self.pgs[r].broadcast([t], opts).wait()
                    out.append((name, t))
                return out
        else:
            raise BadRequest(f"Unknown load_format={load_format}")
        return same_on_tp_ranks(on_ranks(len(self.pgs), one))

    def receive_raw(self, numel: int) -> None:
        """One broadcast of numel bytes on every TP rank, dropped (tools/bench_weight_sync.py)."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        on_ranks(len(self.pgs), lambda r: self.pgs[r].broadcast([torch.empty(numel, dtype=torch.uint8)], opts).wait())

    def destroy(self):
        dist.destroy_process_group(self.pgs[0])  # the others were never registered with torch
        self.pgs = []


MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # SGLang's GPU_MEMORY_ALL_TYPES


class State:
    def __init__(self, model, context_length: int, decode_latency_s: float = 0.0,
                 max_running_requests: int = 0, tp: int = 1, memory_saver: bool = False,
                 weights_by_name: bool = True, routed_experts: bool = False):
        self.model = model
        self.routed_experts = routed_experts  # --enable-return-routed-experts
        self.synthetic = isinstance(model, SyntheticModel)
        self.tp = tp
        self.memory_saver = memory_saver
        self.weights_by_name = weights_by_name and not self.synthetic
        self.released: set[str] = set()
        self.events: list[dict] = []
        self.generated = 0  # /generate requests answered
        self.events_lock = threading.Lock()
        self.context_length = context_length
        self.decode_latency_s = decode_latency_s
        self.max_running = max_running_requests  # in sequences (rows), 0: unlimited
        self.running = 0
        self.capacity = threading.Condition()
        self.groups: dict[str, WeightGroup] = {}
        self.updating = False  # between /begin_weight_update and /end_weight_update
        self.exit_after: int | None = None  # test fault: the process dies after this many more buckets

    def event(self, op: str, **fields) -> None:
        """Kept for GET /events, and written to the log (which outlives the server) as EVENT {json}."""
        with self.events_lock:
            self.events.append({"op": op, **fields, "generated": self.generated})
            print("EVENT " + json.dumps(self.events[-1]), file=sys.stderr, flush=True)

    def push_refused(self, path: str, session: bool = True) -> str | None:
        """Why a weight push must not run now (SGLang's words for the session), or None."""
        if session and not self.updating:
            return f"{path[1:]} must run between begin_weight_update() and end_weight_update()"
        if "weights" in self.released:
            return "weights are released; resume_memory_occupation(['weights']) first"
        return None

    def pushed(self, kind: str, version, message: str) -> str:
        """Record a push that replaced (or, synthetic, dropped) the weights; -> its message."""
        self.event("weights_updated", kind=kind, **({} if version is None else {"version": str(version)}))
        if version is not None:  # SGLang's tokenizer manager adds this
            message += f" Weight version updated to {version}."
        return message

    def memory(self, op: str, tags) -> None:
        """/release_memory_occupation or /resume_memory_occupation: track the released set."""
        if not self.memory_saver:
            raise BadRequest("the memory saver is off: start the server with --enable-memory-saver")
        tags = list(tags or MEMORY_TAGS)  # SGLang: none or [] means all
        for tag in tags:
            if tag not in MEMORY_TAGS:
                raise BadRequest(f"unknown memory tag {tag!r}: one of {', '.join(MEMORY_TAGS)}")
        if op == "release":
            if self.running:
                raise BadRequest("release_memory_occupation should be called only when server is idle.")
            if self.released & set(tags):
                raise BadRequest(f"already released: {sorted(self.released & set(tags))}")
            self.released |= set(tags)
        else:
            if set(tags) - self.released:
                raise BadRequest(f"not released: {sorted(set(tags) - self.released)}")
            self.released -= set(tags)
        self.event(op, tags=tags)

    def check_length(self, prompt: list, sp: dict) -> None:
        """SGLang's TokenizerManager check, with its >= and its words."""
        n_in, max_new = len(prompt), sp.get("max_new_tokens")
        if n_in >= self.context_length:
            raise BadRequest(f"The input ({n_in} tokens) is longer than the model's context "
                             f"length ({self.context_length} tokens).")
        if max_new is not None and int(max_new) + n_in >= self.context_length:
            raise BadRequest(
                f"Requested token count exceeds the model's maximum context length of "
                f"{self.context_length} tokens. You requested a total of {int(max_new) + n_in} "
                f"tokens: {n_in} tokens from the input messages and {int(max_new)} tokens for the "
                f"completion. Please reduce the number of tokens in the input messages or the "
                f"completion to fit within the limit.")

    def routed_from(self, body: dict, rows) -> int | None:
        """Where the answers' routed experts start, None for none: SGLang checks
        routed_experts_start_len whenever they are asked for, and reports them only when
        started with --enable-return-routed-experts (else silently nothing)."""
        if not body.get("return_routed_experts"):
            return None
        start = int(body.get("routed_experts_start_len", 0))
        if start < 0:
            raise BadRequest(f"recv_req.routed_experts_start_len={start} is lower than 0. "
                             "Please use a non-negative routed_experts_start_len.")
        shortest = min(len(prompt) for prompt, _ in rows)
        if start > shortest:
            raise BadRequest(f"recv_req.routed_experts_start_len={start} is higher than the number of input "
                             f"tokens len(req.origin_input_ids)={shortest}. Please use a smaller "
                             "routed_experts_start_len.")
        return start if self.routed_experts else None

    def generate(self, rows, return_logprob: bool, routed_from: int | None = None) -> list[dict]:
        """All rows of a request, holding len(rows) of the engine's running slots meanwhile."""
        k = len(rows)
        with self.capacity:
            self.capacity.wait_for(lambda: not self.max_running or self.running == 0
                                   or self.running + k <= self.max_running)
            self.running += k
        try:
            results = [self.model.sample(p, sp, return_logprob, routed_from) for p, sp in rows]
            if self.decode_latency_s > 0:
                time.sleep(max(len(r["output_ids"]) for r in results) * self.decode_latency_s)
            return results
        finally:
            with self.capacity:
                self.running -= k
                self.capacity.notify_all()


def _rows(body: dict):
    """(prompt, sampling_params) per request, n samples of a prompt next to each other."""
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise BadRequest("input_ids must be a list of token ids or a list of such lists")
    single = not isinstance(ids[0], list)
    prompts = [ids] if single else ids
    sps = body.get("sampling_params") or {}
    if isinstance(sps, dict):
        sps = [sps] * len(prompts)
    if len(sps) != len(prompts):
        raise BadRequest(f"{len(sps)} sampling_params for {len(prompts)} requests")
    rows = []
    for prompt, sp in zip(prompts, sps):
        n = int(sp.get("n", 1))
        seed = sp.get("sampling_seed")
        for j in range(n):  # distinct seeds for parallel samples of one request
            rows.append((prompt, {**sp, "sampling_seed": None if seed is None else int(seed) + j}))
    return single and len(rows) == 1, rows


def handle(state: State, method: str, path: str, body: dict):
    """-> (status, JSON-able answer or text)."""
    m = state.model
    if method == "GET" and path in ("/health", "/health_generate"):
        return 200, ""
    if method == "GET" and path in ("/model_info", "/get_model_info"):
        return 200, {"model_path": m.model_path, "tokenizer_path": None, "is_generation": True,
                     "tp_size": state.tp, "dp_size": 1, "weight_version": m.weight_version}
    if method == "GET" and path in ("/server_info", "/get_server_info"):
        return 200, {"tp_size": state.tp, "dp_size": 1, "model_path": m.model_path,
                     "context_length": state.context_length,
                     "max_running_requests": state.max_running}
    if method == "GET" and path == "/events":
        with state.events_lock:
            return 200, list(state.events)
    if path == "/get_weights_by_name":  # GET or POST, as SGLang
        t = m.sd.get(body["name"]) if state.weights_by_name else None
        if t is None:  # SGLang's answer to an unknown name, and to a model without the method
            return 400, {"error": {"message": "Get parameter by name failed"}}
        return 200, t[:int(body.get("truncate_size", 100))].float().tolist()
    if method != "POST":
        return 404, {"error": {"message": f"no {method} {path}"}}
    if path == "/generate":
        if state.released & {"weights", "kv_cache"}:
            raise BadRequest(f"cannot generate while {', '.join(sorted(state.released))} released: "
                             f"resume_memory_occupation first")
        single, rows = _rows(body)
        for prompt, sp in rows:
            state.check_length(prompt, sp)
        results = state.generate(rows, bool(body.get("return_logprob")), state.routed_from(body, rows))
        with state.events_lock:
            state.generated += 1
        return 200, results[0] if single else results
    if path == "/flush_cache":
        return 200, "Cache flushed.\n"
    if path == "/update_weight_version":
        with m.lock:
            m.weight_version = str(body["new_version"])
        return 200, {"success": True, "new_version": m.weight_version}
    if path in ("/release_memory_occupation", "/resume_memory_occupation"):
        state.memory(path[1:].split("_")[0], body.get("tags"))
        return 200, None  # SGLang's handler returns nothing: JSON null
    if path == "/update_weights_from_disk":
        refused = state.push_refused(path, session=False)
        try:
            if refused:
                raise BadRequest(refused)
            m.load_dir(body["model_path"], body.get("weight_version"))
        except (BadRequest, OSError, ValueError, KeyError) as e:
            return 400, {"success": False, "message": f"Failed to update weights: {e}", "num_paused_requests": 0}
        message = state.pushed("disk", body.get("weight_version"), "Succeeded to update model weights.")
        return 200, {"success": True, "message": message, "num_paused_requests": 0}
    if path == "/init_weights_update_group":
        name = body.get("group_name", "weight_update_group")
        if name in state.groups:
            return 400, {"success": False, "message": f"group {name!r} already exists"}
        if torch is None:  # synthetic: its ranks join all the same, so the trainer's push goes on
            import_torch()
        try:
            state.groups[name] = WeightGroup(body, state.tp)
        except (BadRequest, RuntimeError, ValueError) as e:
            return 400, {"success": False, "message": f"Failed to initialize custom process group: {e}."}
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}
    if path == "/destroy_weights_update_group":
        group = state.groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is None:
            return 400, {"success": False, "message": "The group to be destroyed does not exist."}
        group.destroy()
        return 200, {"success": True, "message": "Succeeded to destroy custom process group."}
    if path == "/begin_weight_update":
        if state.updating:
            return 400, {"success": False, "message": "a weight-update session is already open; "
                                                      "call end_weight_update() first"}
        state.updating = True
        state.event("begin_weight_update")
        return 200, {"success": True, "message": "Success"}
    if path == "/end_weight_update":
        if not state.updating:
            return 400, {"success": False, "message": "no weight-update session is open; "
                                                      "call begin_weight_update() first"}
        state.updating = False
        state.event("end_weight_update")
        return 200, {"success": True, "message": "Success"}
    if path == "/update_weights_from_distributed":
        refused = state.push_refused(path)
        if refused:
            return 400, {"success": False, "message": refused}
        name = body.get("group_name", "weight_update_group")
        group = state.groups.get(name)
        try:
            if group is None:
                raise BadRequest(f"Group {name} not in {list(state.groups)}. "
                                 "Please call `init_weights_update_group` first.")
            received = group.receive(body["names"], body["dtypes"], body["shapes"], body.get("load_format"))
        except (BadRequest, RuntimeError, ValueError, TypeError) as e:
            return 400, {"success": False, "message": f"Failed to receive weights: {e}"}
        if state.exit_after is not None:
            state.exit_after -= 1
            if state.exit_after <= 0:  # an engine dying in the middle of a push, before it answers
                os._exit(3)
        try:
            m.load_tensors(received, body.get("weight_version"))
        except BadRequest as e:
            return 400, {"success": False, "message": f"Failed to update parameter online: {e}"}
        message = state.pushed("distributed", body.get("weight_version"), "Succeeded to update parameter online.")
        return 200, {"success": True, "message": message}
    if path == "/test_exit_after_buckets":  # not SGLang: a fault for the tests
        state.exit_after = int(body["n"])
        return 200, {"success": True}
    if path == "/bench_receive":  # not SGLang: the raw broadcast a push is measured against
        group = state.groups[body.get("group_name", "weight_update_group")]
        group.receive_raw(int(body["numel"]))
        return 200, {"success": True}
    if path == "/update_weights_from_tensor":
        refused = state.push_refused(path)
        entries = body["serialized_named_tensors"]
        if not refused and len(entries) != state.tp:
            refused = f"{len(entries)} serialized_named_tensors for {state.tp} TP ranks: one per rank"
        if refused:
            return 400, {"success": False, "message": refused}
        if torch is None:
            import_torch()
        per_rank, errors = [], []
        for i, entry in enumerate(entries):  # TP rank i reads entry i only, as SGLang's ranks do;
            try:  # every entry is read: each holds a reference to the trainer's shared memory
                per_rank.append(tensor_payload(entry, body.get("load_format")))
            except Exception as e:  # noqa: BLE001 - any malformed payload is the caller's fault
                errors.append(f"serialized_named_tensors[{i}]: {type(e).__name__}: {e}")
        if errors:
            return 400, {"success": False, "message": errors[0]}
        try:
            m.load_tensors(same_on_tp_ranks(per_rank), body.get("weight_version"), copy=True)
        except BadRequest as e:
            return 400, {"success": False, "message": str(e)}
        return 200, {"success": True, "message": state.pushed("tensor", body.get("weight_version"), "Success")}
    return 404, {"error": {"message": f"no POST {path}"}}


def make_handler(state: State):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self, method):
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                status, answer = handle(state, method, self.path, body)
            except BadRequest as e:  # SGLang's shape of a refusal: the message alone
                status, answer = 400, {"error": {"message": str(e)}}
            except (KeyError, TypeError, ValueError) as e:
                status, answer = 400, {"error": {"message": f"{type(e).__name__}: {e}"}}
            except Exception as e:  # noqa: BLE001 - a server answers 500, it does not die
                status, answer = 500, {"error": {"message": f"{type(e).__name__}: {e}"}}
            raw = (answer if isinstance(answer, str) else json.dumps(answer)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(answer, str) else "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def log_message(self, fmt, *args):
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # not 5: a router opens many connections at once


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--tp", "--tp-size", dest="tp", type=int, default=1,
                    help="TP ranks joining a weight-update group (all serve the full weights)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--context-length", type=int, default=None,
                    help="default: the config's max_position_embeddings (synthetic: 32768)")
    ap.add_argument("--max-running-requests", type=int, default=0,
                    help="running sequences (rows) at most; 0: unlimited")
    ap.add_argument("--decode-latency-s", type=float, default=0.0,
                    help="seconds per decoded token of a request's longest row")
    ap.add_argument("--base-gpu-id", type=int, default=0, help="accepted and ignored, as on CPU")
    ap.add_argument("--enable-memory-saver", action="store_true",
                    help="allow /release_memory_occupation and /resume_memory_occupation")
    ap.add_argument("--no-weights-by-name", action="store_true",
                    help="refuse /get_weights_by_name, as SGLang does for Ling (BailingMoeForCausalLM)")
    ap.add_argument("--enable-return-routed-experts", action="store_true",
                    help="answer return_routed_experts with meta_info.routed_experts (not in synthetic mode)")
    ap.add_argument("--synthetic-vocab", type=int, default=0, help="> 0: synthetic mode, no model")
    ap.add_argument("--synthetic-median-len", type=float, default=200.0)
    ap.add_argument("--synthetic-len-sigma", type=float, default=0.8)
    ap.add_argument("--synthetic-eos", type=int, default=1)
    args, unknown = ap.parse_known_args(argv)
    if args.tp < 1:
        ap.error("--tp must be at least 1")
    if args.enable_return_routed_experts and args.synthetic_vocab > 0:
        ap.error("--enable-return-routed-experts: synthetic mode has no router whose experts it could report")
    if unknown:
        print(f"ignoring SGLang options {unknown}", file=sys.stderr)
    if args.synthetic_vocab > 0:
        model = SyntheticModel(args.model_path, args.synthetic_vocab, args.synthetic_eos,
                               args.synthetic_median_len, args.synthetic_len_sigma)
    else:
        import_torch()
        torch.set_num_threads(1)
        model = Model(args.model_path, args.dtype)
    context = args.context_length or model.config.get("max_position_embeddings") or 32768
    state = State(model, context, args.decode_latency_s, args.max_running_requests, args.tp,
                  args.enable_memory_saver, not args.no_weights_by_name, args.enable_return_routed_experts)
    server = Server((args.host, args.port), make_handler(state))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    mode = " (synthetic)" if state.synthetic else ""
    print(f"serving {args.model_path}{mode} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
