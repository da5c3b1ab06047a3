"""The distillation recipe (`stage: distill`, paper 4.1.1): long-CoT SFT on packed rows, and
the `select` section that chooses among its checkpoints by entropy (paper 4.3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from megatron_ring.recipe.schema import (MOVED_TO_OPTIMIZER, ClusterSection, LoggingSection, ModelSection,
                                         OptimizerSection, ParallelSection, SampledEval, TrainCommon,
                                         check_positive)
from megatron_ring.recipe.typed import FieldError, RecipeError


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)  # SFT jsonl / parquet files; `{run_dir}` is expanded
    # A directory `megatron-ring data prepare` wrote (indexed .bin/.idx); empty: the stage
    # prepares `train` into RUN_DIR/cache itself before training.
    prepared: str = ""
    tokenizer: str = ""  # Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json)
    # auto: the tokenizer directory's chat_template, Ling's built-in one when it has none;
    # ling: Ling's always; tokenizer: the directory's (an error when it has none).
    chat_template: Literal["auto", "ling", "tokenizer"] = "auto"
    messages_key: str = "messages"  # the row key holding the conversation
    roles: dict[str, str] = field(default_factory=dict)  # row role name -> system|user|assistant
    prepare_workers: int = 0  # tokenising processes of `data prepare`; 0: the machine's CPUs
    seq_length: int = 32768  # packing length = context
    pack: bool = True  # pack documents into rows (no attention across them); else pad each alone
    bad_rows: Literal["skip", "fail"] = "fail"
    demo: str | None = None  # generate the embedded demo data set here first (tiny recipes)
    demo_sft_rows: int = 6000  # SFT rows of that data set

    def __post_init__(self):
        check_positive(seq_length=self.seq_length)


@dataclass
class TrainSection(TrainCommon):
    MOVED: ClassVar[dict[str, str]] = MOVED_TO_OPTIMIZER

    epochs: int = 3
    global_batch: int = 256  # rows (packed sequences) per optimizer step
    micro_batch: int = 1  # rows per forward/backward
    save_every_steps: int = 0  # 0: only at the end of each epoch
    save_initial: bool = False  # also save step 0 (the untrained baseline for `select`)
    seed: int = 1234
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU

    def __post_init__(self):
        super().__post_init__()
        check_positive(epochs=self.epochs, global_batch=self.global_batch, micro_batch=self.micro_batch)


@dataclass
class SelectSection(SampledEval):
    entropy_low: float = 0.3
    entropy_high: float = 0.5
    # Who samples each checkpoint: the model in the select processes (the CPU demo), or an SGLang
    # server / router the checkpoint is pushed to (at scale); the entropy is then measured with
    # one teacher-forced pass of the model over the server's samples.
    engine: Literal["embedded", "sglang"] = "embedded"
    url: str | None = None  # sglang: a running server or router; none: select starts one server
    server_args: list[str] = field(default_factory=list)  # extra sglang.launch_server arguments
    ready_timeout_s: float = 1800.0  # how long the server may take to load its model and answer /health
    control_timeout_s: float = 21600.0  # how long the other ranks wait (gloo) while rank 0 awaits the samples

    def __post_init__(self):
        super().__post_init__()
        if self.engine == "embedded" and (self.url or self.server_args):
            raise FieldError("url and server_args need engine: sglang", "engine", "url" if self.url else "server_args")
        check_positive(ready_timeout_s=self.ready_timeout_s, control_timeout_s=self.control_timeout_s)
        if not self.entropy_low < self.entropy_high:
            raise FieldError(f"entropy_low ({self.entropy_low}) must be below entropy_high ({self.entropy_high})",
                             "entropy_low", "entropy_high")


@dataclass
class DistillRecipe:
    stage: Literal["distill"] = "distill"
    name: str = "distill"
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    select: SelectSection = field(default_factory=SelectSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self):
        if self.cluster.sglang != "colocated":
            raise FieldError("dedicated SGLang nodes serve RL rollouts; a distill recipe has none", "cluster.sglang")

    def check_batch(self, layout) -> None:
        """The global batch splits into micro-batches over the data-parallel ranks."""
        t = self.train
        per_step = layout.dp * t.micro_batch
        if t.global_batch % per_step:
            raise RecipeError(
                f"train.global_batch: {t.global_batch} rows do not split into micro-batches of "
                f"{t.micro_batch} over {layout.dp} data-parallel ranks (need a multiple of {per_step})")

    def describe_batch(self, layout) -> str:
        t = self.train
        micro_per_rank = t.global_batch // (layout.dp * t.micro_batch)
        return (f"global batch {t.global_batch} = DP {layout.dp} x micro-batch {t.micro_batch} x "
                f"{micro_per_rank} accumulation steps")
