"""The pipeline recipe (`stage: pipeline`): the stages that `megatron-ring run` chains,
distill -> select -> RL stages, each naming its own recipe and overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_ring.recipe.typed import FieldError


@dataclass
class PipelineStage:
    name: str  # its run directory under the pipeline's
    kind: Literal["distill", "select", "rl"]
    recipe: str = ""  # path relative to the pipeline recipe (distill, rl)
    overrides: list[str] = field(default_factory=list)  # key=value; `{pipeline_dir}` is expanded


@dataclass
class PipelineRecipe:
    """Stages run in order: select chooses among the last distill's checkpoints, the first RL
    stage starts from that choice and every later RL stage from the previous one's result."""

    stage: Literal["pipeline"] = "pipeline"
    name: str = "pipeline"
    stages: list[PipelineStage] = field(default_factory=list)

    def __post_init__(self):
        if not self.stages:
            raise FieldError("at least one stage", "stages")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise FieldError(f"names must be unique, got {names}", "stages")
