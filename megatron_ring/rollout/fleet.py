"""The engine fleet a stage samples from: SGLang servers (each `--tp k`, dp 1) and, when there is
more than one, the real sglang-router in front of them; the trainer sends every request to
`url`. Started here (colocated: every node's local rank 0 starts its node's engines on GPUs
--base-gpu-id 0, k, 2k, ...; rank 0 starts the router), or connected to by URL (one server, or a
router whose workers are read from it: the SLURM script starts dedicated fleets).

`prune` is what a failing request calls before it is retried: engines that stopped answering
/health leave the router, so no request is sent to them again, and when none is left the round
fails with one error that names every engine."""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch.distributed as dist

from megatron_ring.platform import distributed
from megatron_ring.rollout.base import RolloutError
from megatron_ring.rollout.router import Router
from megatron_ring.rollout.sglang_client import SGLangClient
from megatron_ring.rollout.sglang_server import SGLANG_COMMAND, SGLangServer, server_argv

PRUNE_EVERY_S = 2.0


class Fleet:
    def __init__(self, url: str, engines: list[str], servers=(), router: Router | None = None):
        self.url, self.engines = url.rstrip("/"), [u.rstrip("/") for u in engines]
        self.servers, self.router = list(servers), router  # what this process started (and stops)
        self.lost: list[str] = []
        self._pruning, self._pruned_at = threading.Lock(), float("-inf")

    @classmethod
    def connect(cls, url: str, ready_timeout_s: float = 600.0, poll_s: float = 2.0) -> "Fleet":
        """A running server or router, once it answers /health (a dedicated one may still be
        loading): a server is its own engine; a router's engines are its workers, waited for (it
        answers /health before its first worker is registered)."""
        deadline = time.monotonic() + ready_timeout_s
        SGLangClient(url).wait_healthy(ready_timeout_s)
        while True:
            try:  # sglang-router answers GET /workers; a server does not
                answer = SGLangClient(url, timeout_s=30.0).request("GET", "/workers", retry=False)
            except RolloutError:
                return cls(url, [url])
            workers = [w["url"] for w in answer.get("workers", []) if w.get("is_healthy", True)] \
                if isinstance(answer, dict) else []
            if workers:
                return cls(url, [w["url"] for w in answer["workers"]])
            if time.monotonic() > deadline:
                raise RolloutError(f"router {url}: no healthy worker after {ready_timeout_s:g} s "
                                   f"(rollout.ready_timeout_s); GET /workers answered {str(answer)[:300]}")
            time.sleep(poll_s)

    @classmethod
    def start(cls, plan, model_path, log_dir, command=SGLANG_COMMAND, env: dict | None = None,
              ready_timeout_s: float = 1800.0, host: str | None = None) -> "Fleet":
        """Collective. Every node's local rank 0 starts its engines on model_path (logs in
        log_dir); rank 0 starts the router over all of them when plan.router."""
        log_dir = Path(log_dir)
        multi_node = dist.is_initialized() and distributed.launched_world_size() > int(
            os.environ.get("LOCAL_WORLD_SIZE", distributed.launched_world_size()))
        host = host or ("0.0.0.0" if multi_node else "127.0.0.1")
        reach = socket.gethostname() if host == "0.0.0.0" else host
        node = int(os.environ.get("GROUP_RANK", "0"))  # torchrun's node rank
        servers, outcome = [], ("ok", [])
        if int(os.environ.get("LOCAL_RANK", "0")) == 0 and node < plan.hosts:
            try:
                for slot, gpu in enumerate(plan.base_gpu_ids[:plan.node_engines(node)]):
                    port = distributed.free_port()
                    argv = server_argv(model_path, host, port, extra_args=[*plan.server_args, "--base-gpu-id", gpu],
                                       command=command)
                    servers.append(SGLangServer(argv, reach, port, log_dir / f"sglang_engine_node{node}_{slot}.log", env))
                for server in servers:  # all load at once, then each is waited for
                    server.wait_ready(ready_timeout_s)
                outcome = ("ok", [s.url for s in servers])
            except Exception as e:  # every rank must hear of it (they meet in the gather below)
                outcome = ("error", str(e) if isinstance(e, RolloutError) else f"{type(e).__name__}: {e}")
        everyone = distributed.everyone(outcome)
        errors = [msg for kind, msg in everyone if kind == "error"]
        urls = [u for kind, msg in everyone if kind == "ok" for u in msg]
        fleet = cls(urls[0] if urls else "", urls, servers)
        try:
            if errors:
                raise RolloutError("the rollout fleet did not start: " + "; ".join(errors))
            if plan.router:
                def start_router() -> str:
                    fleet.router = Router.start(urls, log_dir / "sglang_router.log")
                    return fleet.router.url

                fleet.url = distributed.rank0_then_broadcast(start_router, RolloutError)
        except BaseException:
            fleet.close()
            raise
        return fleet

    def healthy(self) -> list[str]:
        alive = self.each(lambda client: client.health(timeout_s=10.0))
        return [u for u, ok in zip(self.engines, alive) if ok]

    def prune(self) -> None:
        """Drop engines that no longer answer /health (from the router too); RolloutError naming
        every engine when none is left. Many requests fail at once when an engine dies: one of
        them checks, the others within PRUNE_EVERY_S use its answer."""
        with self._pruning:
            if time.monotonic() - self._pruned_at >= PRUNE_EVERY_S:
                alive = self.healthy()
                for url in self.engines:
                    if url not in alive:
                        self.lost.append(url)
                        if self.router is not None:
                            self.router.remove_worker(url)
                self.engines, self._pruned_at = alive, time.monotonic()
        if not self.engines:
            raise RolloutError(f"no rollout engine is left: {', '.join(self.lost)} stopped answering /health"
                               + (f" (router {self.url})" if self.url not in self.lost else ""))

    def each(self, fn) -> list:
        """fn(SGLangClient) on every engine at once (weight pushes); the first error is raised."""
        with ThreadPoolExecutor(max(1, min(32, len(self.engines)))) as pool:
            return list(pool.map(lambda u: fn(SGLangClient(u)), self.engines))

    def close(self) -> None:
        try:
            if self.router is not None:
                self.router.stop()
                self.router = None
        finally:
            for server in self.servers:
                server.stop()
            self.servers = []
