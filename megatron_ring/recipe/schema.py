"""The recipe schema's shared sections (model, parallel, cluster, optimizer, held-out sampling,
logging), one dataclass each, defaults the paper's values where it gives them; each recipe kind
adds its own in its module (`distill_schema.py`, `rl_schema.py`, `pipeline_schema.py`; the
loader maps the `stage` key to them). Checks that need only the recipe live in the sections;
checks that need the process count are in `check_layout`, which asks the recipe kind to check
its own batch."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import Literal

from megatron_ring.models.presets import LingArch, get_preset
from megatron_ring.platform.layout import Layout, LayoutError
from megatron_ring.recipe.typed import FieldError, RecipeError


def check_positive(**values):
    for key, value in values.items():
        if value <= 0:
            raise FieldError(f"must be > 0, got {value}", key)


@dataclass
class ModelSection:
    preset: str = "ling-lite"
    init: str | None = None  # HF directory or megatron-ring checkpoint to start from; None: random
    rope_theta: float | None = None  # preset's value unless set (Ling-lite-1.5 SFT: 600000)
    max_position_embeddings: int | None = None
    norm_head: bool | None = None
    aux_loss_coeff: float = 0.0  # MoE load-balancing loss
    z_loss_coeff: float = 0.0  # router z-loss

    def __post_init__(self):
        try:
            get_preset(self.preset)
        except ValueError as e:  # names the known presets
            raise FieldError(str(e), "preset") from None

    def arch(self) -> LingArch:
        changes = {k: getattr(self, k) for k in ("rope_theta", "max_position_embeddings", "norm_head")
                   if getattr(self, k) is not None}
        return get_preset(self.preset).replace(**changes)


@dataclass
class ParallelSection:
    tp: int = 1
    ep: int = 1


_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # MM, HH:MM:SS, D-HH[:MM[:SS]]


@dataclass
class ClusterSection:
    """Where the recipe runs: processes per node here, the SLURM job for `make recipes`."""

    nodes: int = 1
    gpus_per_node: int = 8  # processes per node (gloo processes on CPU)
    accelerator: Literal["gpu", "cpu"] = "gpu"  # cpu: no GPUs are requested from SLURM (tiny recipes)
    partition: str | None = None
    account: str | None = None
    time_limit: str | None = None  # SLURM --time (e.g. 2-00:00:00); None: the partition's limit
    container_image: str | None = None  # run every task in this image through pyxis (--container-image)
    container_mounts: list[str] = field(default_factory=list)  # SRC:DST[:FLAGS], e.g. /data:/data
    sglang: Literal["colocated", "dedicated"] = "colocated"  # RL rollout servers: on the trainer's GPUs, or own nodes
    sglang_nodes: int = 0  # dedicated: nodes of the SGLang server, added to the job
    requeue: bool = True  # preempted or near the time limit: checkpoint, then requeue the job
    signal_before_s: int = 300  # SLURM warns the job this long before its time limit
    sbatch_args: list[str] = field(default_factory=list)  # anything else for #SBATCH (e.g. --qos=high)
    gpu_memory_gb: float = 80.0  # per GPU: the memory plan (`megatron-ring plan`) must fit under it

    def __post_init__(self):
        check_positive(nodes=self.nodes, gpus_per_node=self.gpus_per_node, signal_before_s=self.signal_before_s,
                       gpu_memory_gb=self.gpu_memory_gb)
        if (self.sglang == "dedicated") != (self.sglang_nodes > 0):
            raise FieldError(f"sglang_nodes {self.sglang_nodes} with sglang {self.sglang}; dedicated "
                             "servers need sglang_nodes > 0, co-located ones none", "sglang", "sglang_nodes")
        if self.time_limit is not None and not _SLURM_TIME.match(self.time_limit):
            raise FieldError(f"{self.time_limit!r} is not a SLURM time (MM, HH:MM:SS or D-HH:MM:SS)", "time_limit")
        bad = [m for m in self.container_mounts if len(m.split(":")) not in (2, 3)]
        if bad:
            raise FieldError(f"{bad} are not SRC:DST[:FLAGS]", "container_mounts")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class OptimizerSection:
    """AdamW and its learning-rate schedule (distillation's values: paper 4.1.1, SFT); RL
    recipes take `RLOptimizerSection`, the same keys with RL's defaults."""

    lr: float = 3e-4
    min_lr: float = 0.0
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # constant: after warmup
    warmup_frac: float = 0.01  # of the optimizer steps, linear from 0
    weight_decay: float = 0.1  # decoupled (AdamW)
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95

    def __post_init__(self):
        check_positive(lr=self.lr)
        if not 0 <= self.warmup_frac < 1:
            raise FieldError(f"must be in [0, 1), got {self.warmup_frac}", "warmup_frac")


RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mlp", "moe", "shared_experts")


@dataclass
class RecomputeSection:
    """Activation recompute, Megatron's: `selective` recomputes the listed submodules' outputs in
    the backward pass (core_attn: the attention scores, the largest activation at long context);
    `full` recomputes whole layers from their inputs, `num_layers` layers per checkpointed block
    (Megatron's uniform method)."""

    granularity: Literal["none", "selective", "full"] = "none"
    modules: list[str] = field(default_factory=lambda: ["core_attn"])
    num_layers: int = 1

    def __post_init__(self):
        check_positive(num_layers=self.num_layers)
        bad = [m for m in self.modules if m not in RECOMPUTE_MODULES]
        if bad:
            raise FieldError(f"{bad} are not recompute modules (known: {', '.join(RECOMPUTE_MODULES)})", "modules")


@dataclass
class TrainCommon:
    """Train keys both stages share: micro-batch size in tokens, recompute, checkpoint writing."""

    # Micro-batches by tokens: 0 takes `micro_batch` rows; > 0 packs documents (SFT) or segments
    # (RL) into micro-batches of at most this many tokens, every rank running the same number.
    max_tokens_per_micro_batch: int = 0
    recompute: RecomputeSection = field(default_factory=RecomputeSection)
    keep_last: int = 0  # periodic checkpoints kept (the newest); 0: all
    async_save: bool = False  # write checkpoints in the background while the next step runs

    def __post_init__(self):
        if self.max_tokens_per_micro_batch < 0 or self.keep_last < 0:
            raise FieldError("must be >= 0 (0: off)",
                             "max_tokens_per_micro_batch" if self.max_tokens_per_micro_batch < 0 else "keep_last")
        if self.max_tokens_per_micro_batch and getattr(self, "micro_batch", 1) != 1:
            raise FieldError("a token-sized micro-batch is one packed row: leave micro_batch at 1",
                             "micro_batch", "max_tokens_per_micro_batch")


# A train section still naming an optimizer key is told where it went (`typed.build`).
MOVED_TO_OPTIMIZER: dict[str, str] = {f.name: f"optimizer.{f.name}" for f in fields(OptimizerSection)}


@dataclass
class SampledEval:
    """Sampling a model on held-out RL prompts (selection by entropy, RL evaluation)."""

    prompts: str = ""  # held-out RL prompts jsonl; `{run_dir}` is expanded
    max_prompts: int = 0  # 0: all
    samples_per_prompt: int = 1
    max_new_tokens: int = 32768
    temperature: float = 1.0  # as RL samples
    top_p: float = 1.0
    batch_size: int = 64  # prompts generated together per data-parallel rank
    seed: int = 0

    def __post_init__(self):
        check_positive(samples_per_prompt=self.samples_per_prompt, max_new_tokens=self.max_new_tokens,
                       temperature=self.temperature, batch_size=self.batch_size)


@dataclass
class LoggingSection:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "megatron-ring"
    progress: bool = True


def expand(path: str, run_dir: str | os.PathLike) -> str:
    """Recipe paths may name the run directory as `{run_dir}`."""
    return path.replace("{run_dir}", str(run_dir))


def check_layout(recipe, world_size: int | None = None) -> Layout:
    """The parallel layout at the recipe's (or the given) process count, checked against the
    model and the recipe's batch (its kind's `check_batch`); errors name the recipe keys."""
    world = world_size or recipe.cluster.world_size
    layout = Layout(tp=recipe.parallel.tp, ep=recipe.parallel.ep, world_size=world)
    try:
        layout.validate(recipe.model.arch())
    except LayoutError as e:
        raise RecipeError(f"parallel: {e}") from None
    recipe.check_batch(layout)
    return layout


def describe_layout(recipe, layout: Layout) -> str:
    """The layout and the batch in one line (--dry-run)."""
    return (f"world {layout.world_size} = {recipe.cluster.nodes} node(s) x {recipe.cluster.gpus_per_node}; "
            f"TP {layout.tp} (sequence parallel {'on' if layout.sequence_parallel else 'off'}) x DP {layout.dp}; "
            f"EP {layout.ep} x expert-DP {layout.world_size // layout.ep}; " + recipe.describe_batch(layout))
