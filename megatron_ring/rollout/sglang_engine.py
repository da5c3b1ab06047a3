"""The rollout engine backed by SGLang: an engine fleet given by URL (a server or sglang-router)
or started here (rollout/fleet.py). Only the trainer's rank 0 talks to it; weight pushes are
collective (every rank takes part in the export), and their outcome (or error) reaches every
rank, so a failed push ends the step on all of them before the last checkpoint is touched.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
from pathlib import Path

import torch

from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.models import hf_convert as conv
from megatron_ring.models.hf_checkpoint import HFReader
from megatron_ring.models.weights import export_hf
from megatron_ring.platform.distributed import is_rank0, rank0_then_broadcast
from megatron_ring.rollout import weight_check
from megatron_ring.rollout.base import Completion, RolloutEngine, RolloutError
from megatron_ring.rollout.fleet import Fleet
from megatron_ring.rollout.fleet_client import FleetClient
from megatron_ring.rollout.fleet_plan import FleetPlan
from megatron_ring.rollout.routed_experts import RoutingSpec
from megatron_ring.rollout.sglang_client import SGLangClient
from megatron_ring.rollout.sglang_server import SGLANG_COMMAND, SGLangServer, launch
from megatron_ring.rollout.tensor_push import TensorPush
from megatron_ring.rollout.weight_buckets import KEEP_ROWS, Staging, hf_buckets, sample_names
from megatron_ring.rollout.weight_sync import WeightGroup, push_from_disk

MEMORY_TAGS = ("kv_cache", "weights")  # what a colocated engine frees while the trainer trains


def _master_address(urls: list[str]) -> str:
    """Where the engines reach trainer rank 0: loopback when every engine is on this host."""
    if all(u.split("//", 1)[-1].startswith(("127.0.0.1", "localhost")) for u in urls):
        return "127.0.0.1"
    return os.environ.get("ROLLOUT_MASTER_ADDR") or socket.gethostbyname(socket.gethostname())


def _engine_tp(url: str, default: int) -> int:
    """An engine's TP size, as it reports it (/get_server_info), else the recipe's engine_tp."""
    try:
        return int(SGLangClient(url, timeout_s=30.0).request("GET", "/get_server_info", retry=False).get("tp_size", default))
    except (RolloutError, AttributeError, TypeError, ValueError):
        return default


class SGLangEngine(RolloutEngine):
    """RolloutEngine over a fleet of SGLang servers (one, or many behind sglang-router).

    generate runs on rank 0 only (the other ranks wait on the control group): the FleetClient
    keeps the fleet busy and streams finished groups to on_group.
    push_weights (collective), by weight_mode: "disk" exports HF safetensors into weights_dir (a
    directory every engine can read) and every engine reloads it; "distributed" broadcasts flat
    buckets from rank 0 to every engine over one group (weight_sync.WeightGroup); "tensor" has
    every training GPU hand its colocated engine rank the buckets (tensor_push.TensorPush). Every
    push carries the step as the engines' weight_version and is then verified (weight_check).
    memory_saver: the engines free their KV cache and weights while the trainer trains
    (release_memory) and take them back around the next push.
    routing: every Completion carries the experts each MoE layer chose (Completion.routing);
    the engines must run with --enable-return-routed-experts (FleetPlan adds it to those it starts).
    """

    def __init__(self, client: SGLangClient, *, fleet: Fleet | None = None, server: SGLangServer | None = None,
                 weight_mode: str = "disk", weights_dir=None, export_dtype: torch.dtype = torch.bfloat16,
                 stop_token_ids: list[int] | None = None, sync: WeightGroup | TensorPush | None = None,
                 requests: dict | None = None, bucket_bytes: int = 512 << 20, verify_tensors: int = 0,
                 memory_saver: bool = False, routing: RoutingSpec | None = None):
        """requests: FleetClient options (concurrency, timeout_s, attempts, context_length)."""
        if weight_mode not in ("disk", "distributed", "tensor"):
            raise ValueError(f"weight_mode must be 'disk', 'distributed' or 'tensor', not {weight_mode!r}")
        if weight_mode == "disk" and weights_dir is None:
            raise ValueError("weight_mode 'disk' needs weights_dir (e.g. RUN_DIR/rollout_weights)")
        if (weight_mode == "tensor" or weight_mode == "distributed" and is_rank0()) and sync is None:
            raise ValueError(f"weight_mode {weight_mode!r} needs its sync (WeightGroup on rank 0, TensorPush everywhere)")
        self.client = client
        self.fleet = fleet or Fleet(client.url, [client.url], [server] if server else [])
        self.weight_mode, self.export_dtype, self.bucket_bytes = weight_mode, export_dtype, bucket_bytes
        self.weights_dir = None if weights_dir is None else Path(weights_dir)
        self.stop_token_ids, self.sync = stop_token_ids, sync
        self.verify_tensors, self.memory_saver = verify_tensors, memory_saver
        self.released: list[str] = []
        self.last_push: dict = {}
        self.staging = Staging()  # the push's two bucket buffers, kept from push to push
        options = {"attempts": client.attempts, "backoff_s": client.backoff_s, "backoff_max_s": client.backoff_max_s,
                   **(requests or {})}
        self.routing = routing
        self.requests = FleetClient(self.fleet.url, stop_token_ids=stop_token_ids, on_failure=self.fleet.prune,
                                    routing=routing, **options)

    @property
    def server(self) -> SGLangServer | None:
        """The one server this process started, if any."""
        return self.fleet.servers[0] if len(self.fleet.servers) == 1 else None

    @classmethod
    def connect(cls, url: str, client_options: dict | None = None, **kwargs) -> "SGLangEngine":
        """An engine on a server (or router) that is already running at url."""
        return cls(SGLangClient(url, **(client_options or {})), **kwargs)

    @classmethod
    def launch(cls, model_path, run_dir, port: int | None = None, tp: int = 1, dtype: str | None = None,
               extra_args=(), command=SGLANG_COMMAND, env: dict | None = None,
               ready_timeout_s: float = 600.0, client_options: dict | None = None,
               **kwargs) -> "SGLangEngine":
        """Start a server on model_path from rank 0 (log: run_dir/sglang_server.log); collective."""
        from megatron_ring.platform.distributed import free_port

        server = None

        def start():
            nonlocal server
            server = launch(model_path, Path(run_dir) / "sglang_server.log", port or free_port(),
                            tp=tp, dtype=dtype, extra_args=extra_args, command=command, env=env,
                            ready_timeout_s=ready_timeout_s)
            return server.url

        url = rank0_then_broadcast(start, RolloutError)
        return cls(SGLangClient(url, **(client_options or {})), server=server, **kwargs)

    @classmethod
    def from_recipe(cls, recipe, model, tokenizer, run_dir) -> "SGLangEngine":
        """The recipe's engine (collective): rollout.url (a server or a router), or the fleet
        started on the model's current weights exported to run_dir/rollout_weights;
        rollout.weight_sync picks the push. A server given by URL serves its own weights until
        the first push_weights. recipe.routed_experts: each sample's routed experts too, of the
        model's layers and top-k."""
        ro, run_dir = recipe.rollout, Path(run_dir)
        plan = FleetPlan.of(recipe)
        weights_dir = run_dir / "rollout_weights"
        if ro.url:
            engines = rank0_then_broadcast(lambda: Fleet.connect(ro.url, ro.ready_timeout_s).engines, RolloutError)
            fleet = Fleet(ro.url, engines)
        else:
            if is_rank0() and weights_dir.exists():
                shutil.rmtree(weights_dir)
            # The server reads its tokenizer from the model directory: the trainer's goes with it.
            export_hf(model, weights_dir, torch.bfloat16, source=tokenizer.path)
            fleet = Fleet.start(plan, weights_dir, run_dir / "logs", command=tuple(ro.server_command) or SGLANG_COMMAND,
                                ready_timeout_s=ro.ready_timeout_s)
        requests = {"concurrency": ro.concurrency, "timeout_s": ro.request_timeout_s, "attempts": ro.request_attempts,
                    "context_length": plan.context_length}
        try:
            sync = None
            if recipe.weight_sync == "tensor":
                sync = TensorPush(fleet.engines, plan.engine_tp, plan.engines_per_node)
            elif recipe.weight_sync == "distributed" and is_rank0():
                tps = [plan.engine_tp if fleet.servers or not ro.url else _engine_tp(u, plan.engine_tp)
                       for u in fleet.engines]
                sync = WeightGroup(list(zip(fleet.engines, tps)), _master_address(fleet.engines),
                                   backend="nccl" if torch.cuda.is_available() else "gloo")
        except BaseException:
            fleet.close()
            raise
        routing = RoutingSpec(model.arch.num_layers, model.arch.moe_topk) if recipe.routed_experts else None
        return cls(SGLangClient(fleet.url), fleet=fleet, weights_dir=weights_dir, stop_token_ids=[tokenizer.eos_id],
                   requests=requests, weight_mode=recipe.weight_sync, sync=sync, bucket_bytes=ro.weight_bucket_mb << 20,
                   verify_tensors=ro.verify_tensors, memory_saver=recipe.offload, routing=routing)

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams,
                 keys: list[int] | None = None, on_group=None) -> list[list[Completion]]:
        """Rank 0 only: the fleet's completions, each group handed to on_group as it is done."""
        return self.requests.generate(prompts, n, params, keys, on_group)

    # -- weights ---------------------------------------------------------------------------

    def push_weights(self, model, version: int) -> dict:
        """Collective. Colocated with memory_saver: the weights' memory comes back first, the KV
        cache only after the push (the push's buffers and the KV cache never coexist)."""
        t0 = time.perf_counter()
        self._resume(["weights"])
        names = sample_names(list(conv.expected_hf_shapes(model.arch)), self.verify_tensors, version)
        kept = {n: None for n in names} if is_rank0() else None
        if self.weight_mode == "disk":
            sent = self._push_disk(model, version, kept)
        elif self.weight_mode == "tensor":
            sent = self.sync.push(hf_buckets(model, self.bucket_bytes, self.export_dtype, every_rank=True, keep=kept,
                                             staging=self.staging), version)
        else:
            sent = self._push_distributed(model, version, kept)
        pushed = time.perf_counter()
        kept = {n: t for n, t in (kept or {}).items() if t is not None}
        verified = weight_check.verify(model, self.fleet.engines, kept, version) if names else "off"
        if self.memory_saver and torch.cuda.is_available():
            self.staging = Staging()  # its GPU memory goes to the engines' KV cache for the rollout
            torch.cuda.empty_cache()
        self._resume(["kv_cache"])
        self.last_push = {"push_s": round(pushed - t0, 4), "push_bytes": sent.get("bytes", 0),
                          "push_buckets": sent.get("buckets"),
                          "verify_s": round(time.perf_counter() - pushed, 4), "push_verified": verified}
        return self.last_push

    def _push_disk(self, model, version: int, kept: dict | None) -> dict:
        if is_rank0() and self.weights_dir.exists():
            shutil.rmtree(self.weights_dir)  # no shard of an older export may survive
        export_hf(model, self.weights_dir, self.export_dtype)  # collective, ends with a barrier
        if kept:
            reader = HFReader(self.weights_dir)
            kept.update({n: reader.read(n)[:KEEP_ROWS].float() for n in kept})
        rank0_then_broadcast(lambda: self.fleet.each(lambda c: push_from_disk(c, self.weights_dir, version)),
                             RolloutError)
        shapes = conv.expected_hf_shapes(model.arch).values()
        return {"bytes": sum(math.prod(s) for s in shapes) * self.export_dtype.itemsize}

    def _push_distributed(self, model, version: int, kept: dict | None) -> dict:
        buckets = hf_buckets(model, self.bucket_bytes, self.export_dtype, keep=kept, staging=self.staging)  # collective

        def send():
            try:
                return self.sync.push(buckets, version)
            finally:
                for _ in buckets:
                    pass

        if not is_rank0():
            for _ in buckets:
                pass
        return rank0_then_broadcast(send, RolloutError)

    # -- colocated memory --------------------------------------------------------------------

    def release_memory(self) -> None:
        """Collective: the engines free their KV cache and weights (the trainer needs the GPUs)."""
        if self.memory_saver and not self.released:
            rank0_then_broadcast(lambda: self.fleet.each(lambda c: c.release_memory(list(MEMORY_TAGS))), RolloutError)
            self.released = list(MEMORY_TAGS)

    def _resume(self, tags: list[str]) -> None:
        tags = [t for t in tags if t in self.released]
        if tags:
            rank0_then_broadcast(lambda: self.fleet.each(lambda c: c.resume_memory(tags)), RolloutError)
            self.released = [t for t in self.released if t not in tags]

    def health(self) -> bool:
        return bool(self.fleet.healthy())

    def close(self) -> None:
        try:
            if isinstance(self.sync, WeightGroup):
                self.sync.close()
            self.sync = None
        finally:
            self.fleet.close()
