"""The rollout engine backed by SGLang: an engine fleet given by URL (a server or sglang-router)
or started here (rollout/fleet.py). Only the trainer's rank 0 talks to it; weight pushes are
collective (every rank takes part in the export), and their outcome (or error) reaches every
rank, so a failed push ends the step on all of them before the last checkpoint is touched.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import torch

from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.models.weights import export_hf
from megatron_ring.platform.distributed import free_port, is_rank0, rank0_then_broadcast
from megatron_ring.rollout.base import Completion, RolloutEngine, RolloutError
from megatron_ring.rollout.fleet import Fleet
from megatron_ring.rollout.fleet_client import FleetClient
from megatron_ring.rollout.fleet_plan import FleetPlan
from megatron_ring.rollout.sglang_client import SGLangClient
from megatron_ring.rollout.sglang_server import SGLANG_COMMAND, SGLangServer, launch
from megatron_ring.rollout.weight_sync import WeightBroadcaster, hf_named_tensors, push_from_disk


def _master_address(engine) -> str:
    """Where the server reaches trainer rank 0: loopback for a server started here."""
    if engine.fleet.servers:
        return "127.0.0.1"
    return os.environ.get("ROLLOUT_MASTER_ADDR") or socket.gethostbyname(socket.gethostname())


def _server_tp(engine, server_args) -> int:
    """The server's rank count: --tp of its arguments, else what /get_server_info says."""
    args = [str(a) for a in server_args]
    for flag in ("--tp", "--tp-size", "--tensor-parallel-size"):
        if flag in args:
            return int(args[args.index(flag) + 1])
    try:
        return int(engine.client.request("GET", "/get_server_info").get("tp_size", 1))
    except (RolloutError, AttributeError, TypeError, ValueError):
        return 1


class SGLangEngine(RolloutEngine):
    """RolloutEngine over a fleet of SGLang servers (one, or many behind sglang-router).

    generate runs on rank 0 only (the other ranks wait on the control group): the FleetClient
    keeps the fleet busy and streams finished groups to on_group.
    weight_mode "disk": push_weights exports HF safetensors into weights_dir (a directory every
    engine can read) and every engine reloads it. "distributed": tensors are broadcast to the
    server over a separate process group (see weight_sync.WeightBroadcaster; one engine).
    """

    def __init__(self, client: SGLangClient, *, fleet: Fleet | None = None, server: SGLangServer | None = None,
                 weight_mode: str = "disk", weights_dir=None, export_dtype: torch.dtype = torch.bfloat16,
                 stop_token_ids: list[int] | None = None, broadcaster: WeightBroadcaster | None = None,
                 requests: dict | None = None):
        """requests: FleetClient options (concurrency, timeout_s, attempts, context_length)."""
        if weight_mode not in ("disk", "distributed"):
            raise ValueError(f"weight_mode must be 'disk' or 'distributed', not {weight_mode!r}")
        if weight_mode == "disk" and weights_dir is None:
            raise ValueError("weight_mode 'disk' needs weights_dir (e.g. RUN_DIR/rollout_weights)")
        if weight_mode == "distributed" and broadcaster is None and is_rank0():
            raise ValueError("weight_mode 'distributed' needs a WeightBroadcaster on rank 0")
        self.client = client
        self.fleet = fleet or Fleet(client.url, [client.url], [server] if server else [])
        self.weight_mode, self.export_dtype = weight_mode, export_dtype
        self.weights_dir = None if weights_dir is None else Path(weights_dir)
        self.stop_token_ids, self.broadcaster = stop_token_ids, broadcaster
        options = {"attempts": client.attempts, "backoff_s": client.backoff_s, "backoff_max_s": client.backoff_max_s,
                   **(requests or {})}
        self.requests = FleetClient(self.fleet.url, stop_token_ids=stop_token_ids, on_failure=self.fleet.prune,
                                    **options)

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
        the first push_weights."""
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
        engine = cls(SGLangClient(fleet.url), fleet=fleet, weights_dir=weights_dir, stop_token_ids=[tokenizer.eos_id],
                     requests=requests)
        if ro.weight_sync == "distributed":
            if len(fleet.engines) != 1:  # every rank knows the fleet: all of them stop here
                engine.close()
                raise RolloutError(f"rollout.weight_sync=distributed broadcasts to one engine; the fleet has "
                                   f"{len(fleet.engines)}: use rollout.weight_sync=disk")
            engine.weight_mode = "distributed"
            if is_rank0():
                engine.broadcaster = WeightBroadcaster(
                    SGLangClient(fleet.engines[0]), _master_address(engine), free_port(),
                    server_world_size=_server_tp(engine, plan.server_args),
                    backend="nccl" if torch.cuda.is_available() else "gloo")
        return engine

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams,
                 keys: list[int] | None = None, on_group=None) -> list[list[Completion]]:
        """Rank 0 only: the fleet's completions, each group handed to on_group as it is done."""
        return self.requests.generate(prompts, n, params, keys, on_group)

    def push_weights(self, model, version: int) -> None:
        if self.weight_mode == "disk":
            self._push_disk(model, version)
        else:
            self._push_distributed(model, version)

    def _push_disk(self, model, version: int) -> None:
        if is_rank0() and self.weights_dir.exists():
            shutil.rmtree(self.weights_dir)  # no shard of an older export may survive
        export_hf(model, self.weights_dir, self.export_dtype)  # collective, ends with a barrier
        rank0_then_broadcast(lambda: self.fleet.each(lambda c: push_from_disk(c, self.weights_dir, version)),
                             RolloutError)

    def _push_distributed(self, model, version: int) -> None:
        named = hf_named_tensors(model)  # collective: every rank walks it to the end

        def send():
            try:
                self.broadcaster.push(named, version)
            finally:
                for _ in named:
                    pass

        if not is_rank0():
            for _ in named:
                pass
        rank0_then_broadcast(send, RolloutError)

    def health(self) -> bool:
        return bool(self.fleet.healthy())

    def close(self) -> None:
        try:
            if self.broadcaster is not None:
                self.broadcaster.close()
                self.broadcaster = None
        finally:
            self.fleet.close()
