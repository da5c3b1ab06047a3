"""The RL recipe (`stage: rl`, C3PO, paper 3.1-3.2 and 4.1.1): its own sections, and the
shared ones with RL's defaults. Defaults are the paper's values where it gives them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from megatron_ring.recipe.schema import (MOVED_TO_OPTIMIZER, ClusterSection, LoggingSection, ModelSection,
                                         OptimizerSection, ParallelSection, SampledEval, TrainCommon,
                                         check_positive)
from megatron_ring.recipe.typed import FieldError


@dataclass
class RLDataSection:
    prompts: list[str] = field(default_factory=list)  # RL prompt jsonl / parquet files; `{run_dir}` is expanded
    domains: list[str] = field(default_factory=list)  # keep only these domains; empty: all
    tokenizer: str = ""
    chat_template: Literal["auto", "ling", "tokenizer"] = "auto"  # as the distill recipe's data.chat_template
    bad_rows: Literal["skip", "fail"] = "fail"
    demo: str | None = None  # generate the embedded demo data set here first (tiny recipes)
    demo_sft_rows: int = 6000


@dataclass
class RolloutSection:
    engine: Literal["embedded", "sglang", "replay"] = "embedded"
    url: str | None = None  # sglang: a running server; none: the trainer starts one
    replay_dir: str | None = None  # replay: a run's rollouts/ directory, served again in order
    record: bool = False  # write every rollout round to RUN_DIR/rollouts/ (token ids, text, reward)
    server_args: list[str] = field(default_factory=list)  # extra sglang.launch_server arguments
    server_command: list[str] = field(default_factory=list)  # how an engine is started; empty: python -m sglang.launch_server
    # How new weights reach the engines after every step. disk: an HF export every engine reloads;
    # distributed: rank 0 broadcasts flat buckets to every engine over one NCCL group (gloo on CPU);
    # tensor: colocated only, every training GPU hands its engine its buckets (CUDA IPC);
    # auto: tensor for a colocated fleet the trainer starts, distributed for any other.
    weight_sync: Literal["auto", "disk", "distributed", "tensor"] = "auto"
    weight_bucket_mb: int = 512  # the flat buckets a push sends (one broadcast / IPC handle each)
    verify_tensors: int = 4  # tensors read back from every engine after each push (0: no check)
    # A colocated fleet (ignored for dedicated or given engines): the engines free KV cache and
    # weights while the trainer trains (--enable-memory-saver), and the trainer moves gradient
    # buffers, optimizer state and the reference model off the GPU while the engines roll out.
    offload: bool = False
    ready_timeout_s: float = 1800.0  # how long a server may take to load its model and answer /health
    # The engine fleet (sglang, no url): `engines` SGLang servers of `--tp engine_tp` each (dp 1),
    # behind sglang-router when more than one. 0: one engine per engine_tp GPUs of every node that
    # hosts them (cluster.sglang: the training nodes when colocated, sglang_nodes when dedicated).
    engines: int = 0
    engine_tp: int = 1
    concurrency: int = 256  # requests in flight from the trainer (one request per sample, its own seed)
    request_timeout_s: float = 3600.0  # one request; past it the request is sent again
    request_attempts: int = 4  # tries per request; the router sends a retry to another engine
    context_length: int = 0  # the engines' context; 0: model.max_position_embeddings (clamps max_new_tokens)
    # How long trainer ranks wait (on a gloo group of their own, not NCCL) while rank 0 generates
    # and scores a step's rollouts.
    control_timeout_s: float = 21600.0
    prompts_per_step: int = 512
    samples_per_prompt: int = 16  # K, the GRPO group size
    max_new_tokens: int = 24576
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64  # embedded engine: prompts generated together per data-parallel rank
    # Ask the engines for the experts every MoE layer chose per token (SGLang's
    # --enable-return-routed-experts): the routing agreement is reported every step. Implied by
    # rl.router_replay r3, which replays them in training.
    routed_experts: bool = False
    # embedded engine: "model" samples in the trainer's dtype; "bf16" under bf16 autocast while
    # the trainer stays in fp32 (the train-inference mismatch of a GPU run, made visible on CPU).
    sampler_dtype: Literal["model", "bf16"] = "model"
    max_rounds: int = 4  # c3po: rollout rounds within one step to fill the budget
    seed: int = 0

    def __post_init__(self):
        check_positive(prompts_per_step=self.prompts_per_step, samples_per_prompt=self.samples_per_prompt,
                       max_new_tokens=self.max_new_tokens, temperature=self.temperature, max_rounds=self.max_rounds,
                       engine_tp=self.engine_tp, concurrency=self.concurrency, request_timeout_s=self.request_timeout_s,
                       request_attempts=self.request_attempts, control_timeout_s=self.control_timeout_s,
                       weight_bucket_mb=self.weight_bucket_mb)
        for key in ("engines", "context_length", "verify_tensors"):
            if getattr(self, key) < 0:
                raise FieldError(f"must be >= 0 (0: automatic), got {getattr(self, key)}", key)


@dataclass
class RLSection:
    loss_mode: Literal["c3po", "grpo", "token_mean"] = "c3po"
    token_budget: int = 409600  # Phi: loss tokens per optimizer step (c3po)
    # per_rank: every data-parallel rank takes exactly Phi tokens (Phi x DP per step, the reading
    # that matches the paper's 512 x 16 responses on 256 GPUs); global: Phi over all ranks.
    budget_scope: Literal["per_rank", "global"] = "per_rank"
    # carry (default): responses past the cut, and the cut one's remainder, start the next step,
    # so no sampled token is wasted; drop: they are discarded.
    leftover: Literal["carry", "drop"] = "carry"
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_beta: float = 1e-3  # k3 KL to the frozen initial model
    entropy_coef: float = 5e-4
    drop_zero_variance: bool = False  # drop groups whose K rewards are all equal (no advantage)
    tis_cap: float = 0.0  # truncated importance sampling against rollout logprobs; 0: off
    # Masked importance sampling against the rollout engine: token: a token whose ratio
    # pi_train/pi_rollout leaves [is_mask_low, is_mask_high] gets no loss; sequence: a response
    # (its segment this step) whose geometric-mean ratio leaves the band gets none.
    is_mask: Literal["off", "token", "sequence"] = "off"
    is_mask_low: float = 0.5
    is_mask_high: float = 2.0
    # MoE routing in the training passes (models/router_replay.py): off: the trainer's routers
    # decide; r3: the rollout engine's routing in the old, reference and training passes; r2:
    # the old pass's routing in the training pass (needs ppo_epochs > 1: one epoch has no old pass).
    router_replay: Literal["off", "r3", "r2"] = "off"
    ppo_epochs: int = 1  # optimizer steps on each step's selected tokens
    # The frozen reference model waits in host memory between its forward passes (GPU memory
    # for activations; costs a host-to-device copy of its weights per step).
    reference_offload: bool = False

    def __post_init__(self):
        check_positive(token_budget=self.token_budget, ppo_epochs=self.ppo_epochs)
        if self.tis_cap < 0:
            raise FieldError(f"must be >= 0 (0: off), got {self.tis_cap}", "tis_cap")
        if not 0 <= self.is_mask_low < 1 < self.is_mask_high:
            raise FieldError(f"the band must hold ratio 1: 0 <= is_mask_low < 1 < is_mask_high, got "
                             f"[{self.is_mask_low}, {self.is_mask_high}]", "is_mask_low", "is_mask_high")
        if self.router_replay == "r2" and self.ppo_epochs == 1:
            raise FieldError("r2 replays the old pass's routing, and one PPO epoch has no old pass (the update "
                             "is on-policy, its routing already the old one): use r3, off or ppo_epochs > 1",
                             "router_replay", "ppo_epochs")


@dataclass
class RLOptimizerSection(OptimizerSection):
    """The optimizer keys with RL's defaults (lr 3e-6, constant after warmup)."""

    lr: float = 3e-6
    lr_schedule: Literal["cosine", "linear", "constant"] = "constant"
    warmup_frac: float = 0.0
    weight_decay: float = 0.01
    adam_beta2: float = 0.999


@dataclass
class RLTrainSection(TrainCommon):
    MOVED: ClassVar[dict[str, str]] = MOVED_TO_OPTIMIZER

    steps: int = 100
    micro_batch: int = 1  # sequences per forward/backward
    save_every_steps: int = 10
    seed: int = 1234
    dtype: Literal["auto", "bf16", "fp32"] = "auto"

    def __post_init__(self):
        super().__post_init__()
        check_positive(steps=self.steps, micro_batch=self.micro_batch)


@dataclass
class RewardSection:
    workers: int = 2  # verifier processes, on rank 0's node; 0: its CPUs not taken by trainer ranks
    # per math or science response; a verifier past it is killed and the response scores 0. Code
    # gets the sandbox's own wall clock for the row's cases (+ 5 s) instead.
    timeout_s: float = 10.0
    float_tolerance: float = 0.0  # |got - expected| allowed for floats in function results; a row's own wins

    def __post_init__(self):
        check_positive(timeout_s=self.timeout_s)
        if self.workers < 0:
            raise FieldError(f"must be >= 0 (0: the node's free CPUs), got {self.workers}", "workers")
        if self.float_tolerance < 0:
            raise FieldError(f"must be >= 0, got {self.float_tolerance}", "float_tolerance")

    def pool_size(self, ranks_per_node: int) -> int:
        """Verifier processes: `workers`, or every CPU of the node the trainer ranks leave."""
        return self.workers or max(1, (os.cpu_count() or 1) - ranks_per_node)


@dataclass
class EvalSection(SampledEval):
    every_steps: int = 0  # held-out accuracy every N steps; always before the first and after the last


@dataclass
class RLRecipe:
    stage: Literal["rl"] = "rl"
    name: str = "rl"
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    data: RLDataSection = field(default_factory=RLDataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    rl: RLSection = field(default_factory=RLSection)
    reward: RewardSection = field(default_factory=RewardSection)
    train: RLTrainSection = field(default_factory=RLTrainSection)
    optimizer: RLOptimizerSection = field(default_factory=RLOptimizerSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self):
        if self.rl.kl_beta > 0 and not self.model.init:
            raise FieldError("the KL reference is the model RL starts from; set model.init "
                             "(a distillation checkpoint or HF directory) or rl.kl_beta=0", "model.init", "rl.kl_beta")
        if self.rollout.engine != "sglang" and self.rollout.url:
            raise FieldError("rollout.url is only for rollout.engine=sglang", "rollout.url", "rollout.engine")
        if (self.rollout.engine == "replay") != bool(self.rollout.replay_dir):
            raise FieldError("set rollout.replay_dir exactly when rollout.engine=replay",
                             "rollout.replay_dir", "rollout.engine")
        if self.cluster.sglang == "dedicated" and self.rollout.engine != "sglang":
            raise FieldError("dedicated SGLang nodes need rollout.engine=sglang", "cluster.sglang", "rollout.engine")
        if self.rollout.weight_sync == "tensor" and not self.colocated:
            raise FieldError("weight_sync=tensor hands each engine the weights on its own GPUs: it needs "
                             "rollout.engine=sglang, engines the trainer starts (no rollout.url) and "
                             "cluster.sglang colocated; use weight_sync=distributed (or auto)",
                             "rollout.weight_sync", "rollout.url", "cluster.sglang")
        if self.rollout.sampler_dtype != "model" and self.rollout.engine != "embedded":
            raise FieldError("sampler_dtype is the embedded engine's (an SGLang server has its own --dtype)",
                             "rollout.sampler_dtype", "rollout.engine")

    @property
    def routed_experts(self) -> bool:
        """The engines report each token's routed experts."""
        return self.rollout.routed_experts or self.rl.router_replay == "r3"

    @property
    def colocated(self) -> bool:
        """SGLang engines the trainer starts on its own GPUs."""
        return self.rollout.engine == "sglang" and not self.rollout.url and self.cluster.sglang != "dedicated"

    @property
    def weight_sync(self) -> str:
        """rollout.weight_sync with auto resolved."""
        if self.rollout.weight_sync != "auto":
            return self.rollout.weight_sync
        return "tensor" if self.colocated else "distributed"

    @property
    def offload(self) -> bool:
        return self.rollout.offload and self.colocated

    def check_batch(self, layout) -> None:
        """Nothing to split: the token budget (c3po) or the step's responses set the batch, and
        micro-batches are cut from whatever each rank holds."""

    def describe_batch(self, layout) -> str:
        r, ro = self.rl, self.rollout
        if r.loss_mode != "c3po":
            return f"{r.loss_mode}: every response of {ro.prompts_per_step} prompts x {ro.samples_per_prompt} samples"
        total = r.token_budget * (layout.dp if r.budget_scope == "per_rank" else 1)
        return (f"c3po: {total} loss tokens per step (Phi {r.token_budget} {r.budget_scope.replace('_', ' ')}), "
                f"rollouts of {ro.prompts_per_step} prompts x {ro.samples_per_prompt} samples, leftover {r.leftover}")
