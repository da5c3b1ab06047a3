"""The rollout fleet an RL recipe asks for, resolved and checked before anything starts: how many
SGLang engines of `--tp engine_tp` (dp 1 each), on which nodes and GPUs, behind sglang-router
or not, and the context every request's max_new_tokens is clamped to.

    colocated (cluster.sglang): the engines share the training nodes (the trainer starts them);
    dedicated: they run on the job's last cluster.sglang_nodes nodes (the SLURM script starts
        them and the router, and gives the trainer the router's URL as rollout.url);
    given (rollout.url): a fleet or server started elsewhere, used as is.

No torch, no SGLang: the launcher, `--dry-run` and the SLURM renderer all read it.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import Literal

from megatron_ring.recipe.typed import FieldError

ENGINE_PORT = 30000  # engine j of a node listens on ENGINE_PORT + j
ROUTER_PORT = 29000  # a dedicated fleet's router (its Prometheus exporter: ROUTER_PORT + 1, on 127.0.0.1)
ROUTER_POLICY = "round_robin"
ROUTED_EXPERTS_FLAG = "--enable-return-routed-experts"  # SGLang captures routing only when launched with it

# server_args the fleet sets itself, and the recipe key that decides each.
_FLEET_FLAGS = {
    "--tp": "rollout.engine_tp", "--tp-size": "rollout.engine_tp", "--tensor-parallel-size": "rollout.engine_tp",
    "--dp": "rollout.engines", "--dp-size": "rollout.engines", "--data-parallel-size": "rollout.engines",
    "--base-gpu-id": "the fleet (one engine per engine_tp GPUs)", "--port": "the fleet", "--host": "the fleet",
    "--context-length": "rollout.context_length", "--model-path": "the launcher (data.tokenizer or the export)",
    "--nnodes": "the fleet (an engine is one node's)", "--node-rank": "the fleet (an engine is one node's)",
    "--dist-init-addr": "the fleet (an engine is one node's)",
}


def clamp_max_new_tokens(max_new: int, prompt_len: int, context: int) -> int:
    """What one request may ask for: min(max_new, context - prompt_len - 1) (SGLang refuses
    prompt + max_new_tokens >= its context). <= 0 when the prompt leaves no room: the caller
    skips that prompt and says so. A context <= 0 (unknown) leaves max_new as it is."""
    return min(max_new, context - prompt_len - 1) if context > 0 else max_new


def router_version() -> str:
    try:
        return importlib.metadata.version("sglang-router")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@dataclass
class FleetPlan:
    url: str | None  # rollout.url: a fleet started elsewhere, used as is
    placement: Literal["colocated", "dedicated", "given"]
    engine_tp: int
    engines: int  # resolved (rollout.engines, or all the hosting nodes' GPUs / engine_tp); given: rollout.engines
    engines_per_node: int
    hosts: int  # nodes that run engines (the first `hosts` training nodes, or of the sglang nodes)
    base_gpu_ids: list[int]  # --base-gpu-id of the engines of one node
    router: bool  # sglang-router in front (more than one engine, or dedicated); never for a given url
    context_length: int  # the engines' context: what max_new_tokens is clamped to
    server_args: list[str]  # rollout.server_args + --tp engine_tp + --context-length
    hosting_nodes: int = 0  # nodes the placement offers (cluster.nodes, or cluster.sglang_nodes)
    max_new_tokens: int = 0
    samples_per_prompt: int = 1
    concurrency: int = 1
    request_timeout_s: float = 0.0
    request_attempts: int = 1
    ready_timeout_s: float = 0.0
    control_timeout_s: float = 0.0
    ports: list[int] = field(default_factory=list)  # the engines' ports on one node
    weight_sync: str = "disk"
    weight_bucket_mb: int = 512
    verify_tensors: int = 0
    offload: bool = False
    routed_experts: bool = False  # every request asks for each token's routed experts (recipe.routed_experts)

    @classmethod
    def of(cls, recipe) -> "FleetPlan | None":
        """The plan of an RL recipe whose rollout.engine is sglang; None otherwise (and for
        recipes without a rollout section). Raises FieldError naming the recipe keys."""
        ro = getattr(recipe, "rollout", None)
        if ro is None or ro.engine != "sglang":
            return None
        c = recipe.cluster
        context = ro.context_length or recipe.model.arch().max_position_embeddings
        common = dict(max_new_tokens=ro.max_new_tokens, samples_per_prompt=ro.samples_per_prompt,
                      concurrency=ro.concurrency, request_timeout_s=ro.request_timeout_s,
                      request_attempts=ro.request_attempts, ready_timeout_s=ro.ready_timeout_s,
                      control_timeout_s=ro.control_timeout_s, weight_sync=recipe.weight_sync,
                      weight_bucket_mb=ro.weight_bucket_mb, verify_tensors=ro.verify_tensors, offload=recipe.offload,
                      routed_experts=recipe.routed_experts)
        if ro.url:
            return cls(url=ro.url, placement="given", engine_tp=ro.engine_tp, engines=ro.engines,
                       engines_per_node=0, hosts=0, base_gpu_ids=[], router=False, context_length=context,
                       server_args=[], **common)
        _check_server_args(ro.server_args)
        placement = "dedicated" if c.sglang == "dedicated" else "colocated"
        nodes_key = "cluster.sglang_nodes" if placement == "dedicated" else "cluster.nodes"
        available = c.sglang_nodes if placement == "dedicated" else c.nodes
        if c.gpus_per_node % ro.engine_tp:
            raise FieldError(f"rollout.engine_tp: {ro.engine_tp} does not divide cluster.gpus_per_node "
                             f"{c.gpus_per_node} (an engine's GPUs are one node's)",
                             "rollout.engine_tp", "cluster.gpus_per_node")
        per_node_max = c.gpus_per_node // ro.engine_tp
        engines = ro.engines or available * per_node_max
        per_node = -(-engines // available)  # filled node by node
        if per_node * ro.engine_tp > c.gpus_per_node:
            raise FieldError(f"rollout.engines: {engines} engines of --tp {ro.engine_tp} need {engines * ro.engine_tp} "
                             f"GPUs; the {available} {placement} node(s) ({nodes_key}) have "
                             f"{available * c.gpus_per_node} (at most {available * per_node_max} engines)",
                             "rollout.engines", "rollout.engine_tp", nodes_key)
        hosts = -(-engines // per_node)
        args = [*map(str, ro.server_args)]
        if recipe.routed_experts and not _has_flag(args, ROUTED_EXPERTS_FLAG):
            args.append(ROUTED_EXPERTS_FLAG)
        args += ["--tp", str(ro.engine_tp), "--context-length", str(context)]
        if recipe.offload and "--enable-memory-saver" not in args:  # release/resume_memory_occupation need it
            args.append("--enable-memory-saver")
        return cls(url=None, placement=placement, engine_tp=ro.engine_tp, engines=engines, engines_per_node=per_node,
                   hosts=hosts, base_gpu_ids=[j * ro.engine_tp for j in range(per_node)],
                   router=engines > 1 or placement == "dedicated", context_length=context, server_args=args,
                   hosting_nodes=available, ports=[ENGINE_PORT + j for j in range(per_node)], **common)

    def node_engines(self, node: int) -> int:
        """Engines on hosting node `node` (0-based): engines_per_node, fewer on the last one."""
        return max(0, min(self.engines_per_node, self.engines - node * self.engines_per_node))

    def engine_args(self, j: int, host: str = "0.0.0.0") -> list[str]:
        """sglang.launch_server arguments of engine j of a node (after --model-path)."""
        return [*self.server_args, "--base-gpu-id", str(self.base_gpu_ids[j]), "--port", str(self.ports[j]),
                "--host", host]

    def describe(self) -> list[str]:
        """Human lines for --dry-run: the fleet, the load it gets, the clamp."""
        seq = self.concurrency
        if self.placement == "given":
            lines = [f"rollout fleet: the server at {self.url} (rollout.url), used as is; the trainer sends "
                     "every request there"]
        else:
            engines = f"{self.engines} SGLang engine{'s' if self.engines != 1 else ''}"
            gpus = " ".join(map(str, self.base_gpu_ids))
            if self.placement == "colocated":
                where = ("the training node" if self.hosting_nodes == 1 else
                         f"the {self.hosts} training nodes" if self.hosts == self.hosting_nodes else
                         f"{self.hosts} of the {self.hosting_nodes} training nodes")
                where = f"colocated on {where}"
            else:
                where = f"on {self.hosts} dedicated node{'s' if self.hosts != 1 else ''}"
            per = f"{self.engines_per_node} per node, " if self.engines > 1 else ""
            ports = ""  # the trainer picks free ports for the engines it starts
            if self.placement == "dedicated":
                ports = f", ports {self.ports[0]}-{self.ports[-1]}" if len(self.ports) > 1 else f", port {self.ports[0]}"
            if self.router:
                on = f" on the first of them (port {ROUTER_PORT})" if self.placement == "dedicated" else ""
                front = (f", behind sglang-router {router_version()} ({ROUTER_POLICY}){on}; the trainer sends "
                         "every request to the router")
            else:
                front = "; the trainer sends every request to it"
            lines = [f"rollout fleet: {engines} (--tp {self.engine_tp}, dp 1), {where} ({per}--base-gpu-id "
                     f"{gpus}{ports}){front}",
                     f"engine args: {' '.join(self.server_args)}"]
        load = f"concurrency {seq} requests in flight (one per sample, with its own seed)"
        lines.append(load + (f", {seq / self.engines:.0f} per engine" if self.engines else ""))
        lines.append(f"a request times out after {self.request_timeout_s:g} s, {self.request_attempts} attempts; "
                     f"trainer ranks wait up to {self.control_timeout_s:g} s (rollout.control_timeout_s) for "
                     "rank 0's rollouts")
        clamp = (f"max_new_tokens {self.max_new_tokens} clamped per request to min({self.max_new_tokens}, "
                 f"{self.context_length} - prompt - 1)")
        if self.max_new_tokens >= self.context_length:
            clamp += (f": the clamp binds (max_new_tokens >= context_length {self.context_length}): every request "
                      f"asks for {self.context_length} - prompt - 1 tokens, and a prompt that leaves no room is "
                      "skipped and counted")
        return lines + self._describe_routing() + [clamp, self._describe_weights()]

    def _describe_routing(self) -> list[str]:
        if not self.routed_experts:
            return []
        how = (f"the server must run with {ROUTED_EXPERTS_FLAG} (SGLang silently leaves them out without it)"
               if self.placement == "given" else f"the engines run with {ROUTED_EXPERTS_FLAG}")
        return [f"routed experts: every request asks for each token's experts per MoE layer "
                f"(return_routed_experts; rollout.routed_experts or rl.router_replay r3); {how}"]

    def _describe_weights(self) -> str:
        how = {"disk": "every engine reloads an HF export from RUN_DIR/rollout_weights",
               "distributed": f"rank 0 broadcasts {self.weight_bucket_mb} MB flat buckets to every engine's TP ranks "
                              "over one NCCL group",
               "tensor": f"every training GPU hands its colocated engine rank {self.weight_bucket_mb} MB flat buckets "
                         "(CUDA IPC)"}[self.weight_sync]
        check = (f"{self.verify_tensors} tensors read back from every engine (a logprob probe where the model "
                 "class cannot answer by name)") if self.verify_tensors else "not verified (rollout.verify_tensors 0)"
        line = f"weights after every step ({self.weight_sync}): {how}; {check}"
        if self.offload:
            line += ("; offload: the trainer's gradient buffers, optimizer state and reference model leave the GPU "
                     "while the engines roll out, and the engines release KV cache and weights while it trains")
        return line


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a.split("=", 1)[0] == flag for a in args)


def _check_server_args(server_args) -> None:
    for a in map(str, server_args):
        flag = a.split("=", 1)[0]
        if flag in _FLEET_FLAGS:
            raise FieldError(f"rollout.server_args: {flag} is set by the fleet (decided by {_FLEET_FLAGS[flag]}); "
                             "remove it from rollout.server_args", "rollout.server_args")
