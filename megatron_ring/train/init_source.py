"""What a recipe's `model.init` names, checked without loading a weight: an HF directory (its
config.json, tensor names and shapes), a megatron-ring checkpoint (its ling_arch.json; a
checkpoints/ root means its latest), or a distillation run's selection.json (the checkpoint
`select` chose). The launcher checks it before any process starts and the stage again when it
builds the model, through the same function, so both refuse the same sources the same way.

It also follows where the weights came from: the HF directory a model descends from is recorded
in its checkpoints (trainer_state "hf_source"), so an HF export can carry that directory's
tokenizer, generation config and modeling code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_ring.models.hf_checkpoint import HFReader
from megatron_ring.models.hf_config import CheckpointError, is_hf_dir
from megatron_ring.models.presets import LingArch
from megatron_ring.recipe import RecipeError
from megatron_ring.recipe.schema import expand
from megatron_ring.train.input_check import InputMissing

# Architecture fields a recipe may change on top of the weights it starts from.
OVERRIDABLE = {"rope_theta", "max_position_embeddings", "norm_head"}


@dataclass
class InitSource:
    path: str  # the HF directory or checkpoint directory the weights are read from
    arch: LingArch  # the source's own architecture
    reader: HFReader | None  # set for HF directories
    hf_source: str | None  # the HF directory these weights descend from, when known


def resolve_selection(source: str) -> str:
    """model.init may name a distillation run's selection.json: the checkpoint `select` chose
    (how a pipeline's first RL stage, rendered before the choice exists, finds it)."""
    if Path(source).name != "selection.json":
        return source
    if not Path(source).is_file():
        raise InputMissing(f"model.init: {source} does not exist (run `megatron-ring select` on that run first)")
    try:
        chosen = json.loads(Path(source).read_text()).get("chosen")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise RecipeError(f"model.init: {source} is not a selection record ({e})") from None
    if not chosen:
        raise RecipeError(f"model.init: {source} names no chosen checkpoint")
    return chosen


def recorded_hf_source(checkpoint_dir: str | Path) -> str | None:
    """The HF directory a checkpoint's weights descend from, as recorded at save: trainer_state's
    "hf_source" ("source" in checkpoints converted before it). It may since have gone."""
    state_path = Path(checkpoint_dir) / "trainer_state.json"
    if not state_path.is_file():
        return None
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_path}: unreadable ({e})") from None
    return state.get("hf_source") or state.get("source")


def init_source(recipe, run_dir) -> InitSource | None:
    """The recipe's model.init, checked against its model (None: random weights). Raises
    InputMissing when it does not exist, RecipeError/CheckpointError when it does not fit."""
    if not recipe.model.init:
        return None
    source = resolve_selection(expand(recipe.model.init, run_dir))
    if not Path(source).exists():
        raise InputMissing(f"model.init: {source} does not exist")
    arch, reader = recipe.model.arch(), None
    if is_hf_dir(source):
        reader = HFReader(source)
        init_arch, hf_source = reader.arch, os.path.abspath(source)
    else:
        from megatron_ring.train import checkpoint  # imports Megatron: only for checkpoints

        source = str(checkpoint.latest(source) or source)
        init_arch, hf_source = checkpoint.saved_arch(source), recorded_hf_source(source)
    diff = [f"{k}: {v!r} there, {getattr(arch, k)!r} in the recipe" for k, v in vars(init_arch).items()
            if k not in OVERRIDABLE and getattr(arch, k) != v]
    if diff:
        raise RecipeError(f"model.init: {source} is not a {recipe.model.preset} model ({'; '.join(diff)})")
    if reader is not None:
        reader.validate(arch)  # tensor names and shapes, before any weight is read
    return InitSource(source, init_arch, reader, hf_source)
